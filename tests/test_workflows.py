"""The add-on workflows under patch parallelism, on 2 real ranks: img2img, inpainting,
ControlNet (patch-parallel itself: no rank runs a whole ControlNet) and LoRA adapters
(conv LoRA included), each exact against serial in `patch-sync`."""

import numpy as np
import pytest
import torch

from engine import Engine, ParallelConfig
from engine.metrics import rel_l2

SYNC = ParallelConfig(strategy="patch-sync", cfg_split=False)  # row bands (CFG halves would not split rows)
STEPS = 4


def damp_conv_out(pipe):
    """A per-rank setup (Engine.from_pretrained(setup=...)): every rank changes its model alike."""
    pipe.unet.conv_out.weight.data.mul_(0.5)


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(strategy="patch", world_size=2), setup=damp_conv_out)
    yield e
    e.close()


def test_the_setup_function_ran_on_every_rank_before_the_install(engine, pool):
    kwargs = dict(height=64, width=64, num_inference_steps=2, seed=5, progress=False)
    mine = exact(engine, **kwargs)  # exact: the ranks and rank 0's serial run all have the change
    plain = pool.serial_engine("tiny-sd").generate("a red circle", **kwargs)
    assert rel_l2(mine.latents.numpy(), plain.latents.numpy()) > 1e-3


def test_a_setup_that_cannot_reach_the_ranks_is_refused():
    from engine import ConfigError

    with pytest.raises(ConfigError, match="setup must be picklable"):
        Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(world_size=2), setup=lambda pipe: None)


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(3)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    control = np.zeros((64, 64, 3), np.uint8)
    control[8:40, 20:56] = 255  # a white box: something for the ControlNet to see
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    return image, control, mask


def exact(engine, **kwargs):
    kwargs = {"parallel": SYNC, "num_inference_steps": STEPS, "seed": 5, "progress": False, **kwargs}
    result = engine.generate("a red circle", compare_serial=True, **kwargs)
    err = result.report["vs_serial"]["latent_rel_l2"]
    assert err <= 1e-5, f"differs from serial: rel L2 {err:.2e}"
    return result


def test_img2img_and_inpainting_are_exact(engine, pictures):
    image, _, mask = pictures
    a = exact(engine, image=image, strength=0.6)
    assert a.latents.shape == (1, 4, 8, 8)  # the image's size by default
    b = exact(engine, image=image, mask_image=mask)
    assert rel_l2(a.latents.numpy(), b.latents.numpy()) > 1e-3  # really another workflow


def test_controlnet_is_patch_parallel_and_exact(engine, pictures):
    image, control, _ = pictures
    plain = engine.generate("a red circle", height=64, width=64, num_inference_steps=STEPS, seed=5, parallel=SYNC,
                            progress=False)
    guided = exact(engine, height=64, width=64, controlnet="tiny-controlnet", control_image=control)
    assert rel_l2(guided.latents.numpy(), plain.latents.numpy()) > 1e-3  # the ControlNet acts
    # every rank ran its band of the ControlNet: its layers added halo and K/V traffic
    assert guided.report["per_rank"][0]["bytes_sent"] > 1.2 * plain.report["per_rank"][0]["bytes_sent"]
    # with CFG halves on the two ranks, the ControlNet takes its half of the batch too
    exact(engine, height=64, width=64, controlnet="tiny-controlnet", control_image=control,
          parallel=ParallelConfig(strategy="patch-sync", cfg_split=True))
    # two ControlNets on img2img, and the stale mode close to serial
    exact(engine, image=image, strength=0.7, controlnet=["tiny-controlnet", "tiny-controlnet"],
          control_image=[control, image], controlnet_conditioning_scale=[0.6, 0.4])
    stale = engine.generate("a red circle", height=64, width=64, num_inference_steps=6, seed=5, progress=False,
                            parallel=ParallelConfig(strategy="patch", warmup_steps=2, cfg_split=False), controlnet="tiny-controlnet",
                            control_image=control, compare_serial=True)
    assert stale.report["vs_serial"]["psnr_db"] > 25
    engine.release_controlnets()  # freed on the ranks with the next request; named again, loaded again
    exact(engine, height=64, width=64)
    again = exact(engine, height=64, width=64, controlnet="tiny-controlnet", control_image=control)
    np.testing.assert_allclose(again.latents.numpy(), guided.latents.numpy(), rtol=0, atol=1e-6)


def _random_lora(path, dora=False):
    """A LoRA (or DoRA) on the UNet's 3x3 convs and attention projections, with nonzero up weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from engine.models.presets import PRESETS

    unet = PRESETS["tiny-sd"]().unet
    torch.manual_seed(11)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, use_dora=dora,
                                target_modules=["conv1", "conv2", "to_q", "to_v"]))
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet))
    return path


def test_conv_lora_is_exact_and_switchable(engine, tmp_path):
    before = engine.generate("a red circle", height=64, width=64, num_inference_steps=STEPS, seed=5, parallel=SYNC,
                             progress=False)
    engine.load_lora("style", _random_lora(str(tmp_path)))
    with_lora = exact(engine, height=64, width=64)
    assert rel_l2(with_lora.latents.numpy(), before.latents.numpy()) > 1e-3  # the adapter acts
    off = exact(engine, height=64, width=64, adapters={})
    np.testing.assert_allclose(off.latents.numpy(), before.latents.numpy(), rtol=0, atol=1e-6)
    engine.unload_lora("style")
    after = engine.generate("a red circle", height=64, width=64, num_inference_steps=STEPS, seed=5, parallel=SYNC,
                            progress=False)
    np.testing.assert_allclose(after.latents.numpy(), before.latents.numpy(), rtol=0, atol=1e-6)


def test_dora_conv_adapter_is_exact(engine, tmp_path):
    """peft's DoRA scales the base conv's output: on a band that output must be the patch-aware one."""
    before = engine.generate("a red circle", height=64, width=64, num_inference_steps=STEPS, seed=5, parallel=SYNC,
                             progress=False)
    engine.load_lora("dora", _random_lora(str(tmp_path), dora=True))
    try:
        with_dora = exact(engine, height=64, width=64)
        assert rel_l2(with_dora.latents.numpy(), before.latents.numpy()) > 1e-3  # the adapter acts
    finally:
        engine.unload_lora("dora")


def test_a_guess_mode_controlnet_is_refused_before_the_work(engine, pictures, tmp_path):
    """diffusers runs a ControlNet with global_pool_conditions on the conditional half only,
    which the row split does not take apart: refused by name on every rank."""
    from engine.models.controlnets import load_controlnet

    _, control, _ = pictures
    net = load_controlnet("tiny-controlnet", torch.device("cpu"), None)
    net.register_to_config(global_pool_conditions=True)
    net.save_pretrained(str(tmp_path / "pooled"))
    with pytest.raises(Exception, match="global_pool_conditions"):
        engine.generate("a red circle", height=64, width=64, num_inference_steps=2, progress=False, parallel=SYNC,
                        controlnet=str(tmp_path / "pooled"), control_image=control)
    engine.release_controlnets()
    exact(engine, height=64, width=64)  # the ranks stay


def test_dit_img2img_is_exact(pool, pictures):
    """The transformer pipelines' img2img (SD3 here) through the same token-band layers."""
    image, _, _ = pictures
    engine = pool.parallel_engine("tiny-sd3", 2)
    result = exact(engine, image=image, strength=0.7)
    assert result.report["vs_serial"]["latent_rel_l2"] <= 1e-5
    assert result.latents.shape == (1, 16, 8, 8)  # SD3's 16-channel latents at the image's size
    assert all(part["bytes_sent"] > 0 for part in result.report["per_rank"])  # both ranks really exchanged


def test_previews_reach_the_caller_from_rank_0(engine):
    seen = []
    result = engine.generate("a red circle", height=64, width=64, num_inference_steps=4, seed=5, progress=False,
                             callback=lambda step, preview: seen.append((step, preview)), callback_steps=2)
    assert [step for step, _ in seen] == [1, 3]
    np.testing.assert_allclose(seen[-1][1], result.latents.numpy(), rtol=0, atol=0)  # the last one is the result
    images = []
    engine.generate("a red circle", height=64, width=64, num_inference_steps=2, seed=5, progress=False,
                    callback=lambda step, preview: images.append(preview), preview="image")
    assert len(images) == 2 and images[0].shape == (1, 64, 64, 3) and images[0].dtype == np.uint8


def test_sdxl_controlnet_and_the_refiner_handoff_are_exact(pool, pictures):
    _, control, _ = pictures
    engine = pool.parallel_engine("tiny-sdxl", 2)
    exact(engine, height=64, width=64, controlnet="tiny-sdxl-controlnet", control_image=control)
    base = exact(engine, height=64, width=64, num_inference_steps=6, denoising_end=0.5)
    refined = exact(engine, image=base.latents, num_inference_steps=6, denoising_start=0.5)  # the refiner's part
    assert refined.latents.shape == base.latents.shape
    assert rel_l2(refined.latents.numpy(), base.latents.numpy()) > 1e-3


def test_ip_adapter_keeps_self_attention_patch_parallel_and_is_exact(engine, pictures):
    image, control, _ = pictures
    kwargs = dict(height=64, width=64)
    before = exact(engine, **kwargs)
    engine.load_ip_adapter("tiny-ip-adapter", scale=0.8)
    a = exact(engine, ip_adapter_image=image, **kwargs)
    assert rel_l2(a.latents.numpy(), before.latents.numpy()) > 1e-3  # the image prompt acts
    b = exact(engine, ip_adapter_image=control, parallel=ParallelConfig(strategy="patch-sync", cfg_split=True), **kwargs)
    assert rel_l2(a.latents.numpy(), b.latents.numpy()) > 1e-3  # and depends on the image
    engine.unload_ip_adapter()
    after = exact(engine, **kwargs)
    np.testing.assert_allclose(after.latents.numpy(), before.latents.numpy(), rtol=0, atol=1e-6)


def nine_channel_unet(pipe):
    """A setup giving tiny-sd an inpainting UNet (latents + mask + masked-image latents in)."""
    from diffusers import UNet2DConditionModel

    config = dict(pipe.unet.config, in_channels=9)
    torch.manual_seed(99)
    pipe.unet = UNet2DConditionModel.from_config(config).eval()
    pipe.register_modules(unet=pipe.unet)


def test_a_nine_channel_inpainting_unet_is_exact(pictures):
    image, _, mask = pictures
    with Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(strategy="patch", world_size=2),
                                setup=nine_channel_unet) as nine:
        result = exact(nine, image=image, mask_image=mask, strength=0.9)
        assert result.report["vs_serial"]["latent_rel_l2"] <= 1e-5
        assert result.latents.shape == (1, 4, 8, 8)  # the 9 input channels: latents + mask + masked image
        assert all(part["bytes_sent"] > 0 for part in result.report["per_rank"])


def test_a_failing_preview_callback_fails_its_request_only(engine):
    def broken(step, preview):
        raise ValueError("my callback broke")

    with pytest.raises(ValueError, match="my callback broke"):
        engine.generate("a red circle", height=64, width=64, num_inference_steps=2, progress=False, callback=broken)
    # the next request gets its own result, not the previous one's
    a = engine.generate("a blue square", height=64, width=64, num_inference_steps=2, seed=1, progress=False)
    b = engine.generate("a blue square", height=64, width=64, num_inference_steps=2, seed=1, progress=False)
    np.testing.assert_array_equal(a.latents.numpy(), b.latents.numpy())
    assert a.report["seed"] == 1


def test_adapters_survive_a_failed_request_and_a_restart(engine, tmp_path):
    kwargs = dict(height=64, width=64, num_inference_steps=2, seed=5, progress=False, parallel=SYNC)
    before = engine.generate("a red circle", **kwargs)
    engine.load_lora("again", _random_lora(str(tmp_path)))
    from launch.worker import RequestFailedError

    with pytest.raises(RequestFailedError):  # loads the adapter on the ranks, then fails on every rank
        engine.generate("a red circle", **dict(kwargs, num_inference_steps=1001))
    with_lora = engine.generate("a red circle", **kwargs)  # no "name already in use"
    assert rel_l2(with_lora.latents.numpy(), before.latents.numpy()) > 1e-3
    engine.restart()  # new ranks: the adapter travels again
    again = engine.generate("a red circle", **kwargs)
    np.testing.assert_allclose(again.latents.numpy(), with_lora.latents.numpy(), rtol=0, atol=1e-6)
    engine.unload_lora("again")
    np.testing.assert_allclose(engine.generate("a red circle", **kwargs).latents.numpy(), before.latents.numpy(),
                               rtol=0, atol=1e-6)


# Stale modes with every add-on (LoRA and IP-Adapter on every run): measured on tiny-sd, 64 px,
# 6 steps, warm-up 2, seed 5, PSNR vs serial: patch 47.7 / 44.4 / 52.6 dB and pcpp 48.0 /
# 43.9 / 52.7 dB for img2img / inpainting / ControlNet; with CFG split the 2 ranks take the
# halves (no row split): 87 dB. The threshold leaves ~9 dB below the lowest.
STALE_WORKFLOW_PSNR_DB = 35.0


@pytest.mark.parametrize("strategy", ["patch", "pcpp"])
def test_every_workflow_runs_stale_and_close_to_serial(engine, pictures, tmp_path, strategy):
    image, control, mask = pictures
    config = ParallelConfig(strategy=strategy, warmup_steps=2, cfg_split=False)
    kwargs = dict(height=64, width=64, num_inference_steps=6, seed=5, progress=False, parallel=config,
                  compare_serial=True)
    engine.load_lora("style", _random_lora(str(tmp_path)))
    engine.load_ip_adapter("tiny-ip-adapter", scale=0.8)
    try:
        runs = {
            "img2img": dict(image=image, strength=0.7),
            "inpaint": dict(image=image, mask_image=mask),
            "controlnet": dict(controlnet="tiny-controlnet", control_image=control),
            "two images, CFG split": dict(num_images_per_prompt=2,
                                          parallel=ParallelConfig(strategy=strategy, warmup_steps=2, cfg_split=True)),
        }
        for name, extra in runs.items():  # the LoRA and IP-Adapter act in every one
            result = engine.generate("a red circle", **{**kwargs, **extra, "ip_adapter_image": image})
            psnr = result.report["vs_serial"]["psnr_db"]
            print(f"{strategy} {name}: {psnr:.1f} dB vs serial")
            assert result.report["strategy"] == strategy
            assert psnr > STALE_WORKFLOW_PSNR_DB, (name, psnr)
    finally:
        engine.unload_ip_adapter()
        engine.unload_lora("style")


def test_request_options_are_exact(engine, tmp_path):
    """The pipeline options a request carries, each exact in patch-sync: several images per
    prompt (rows split, and CFG halves on the two ranks), guidance_rescale, a LoRA's scale
    through cross_attention_kwargs, and scheduler options (Karras sigmas)."""
    kwargs = dict(height=64, width=64)
    plain = exact(engine, **kwargs)
    two = exact(engine, num_images_per_prompt=2, **kwargs)
    assert two.latents.shape[0] == 2 and len(two.images) == 2
    np.testing.assert_allclose(two.latents[:1].numpy(), plain.latents.numpy(), rtol=0, atol=1e-5)  # the first is the same
    exact(engine, num_images_per_prompt=2, parallel=ParallelConfig(strategy="patch-sync", cfg_split=True), **kwargs)
    rescaled = exact(engine, guidance_rescale=0.7, **kwargs)
    assert rel_l2(rescaled.latents.numpy(), plain.latents.numpy()) > 1e-3
    karras = exact(engine, scheduler="DPMSolverMultistepScheduler", scheduler_options={"use_karras_sigmas": True},
                   **kwargs)
    assert rel_l2(karras.latents.numpy(), plain.latents.numpy()) > 1e-3
    engine.load_lora("style", _random_lora(str(tmp_path)))
    try:
        full = exact(engine, **kwargs)
        half = exact(engine, cross_attention_kwargs={"scale": 0.5}, **kwargs)
        assert rel_l2(half.latents.numpy(), full.latents.numpy()) > 1e-4  # the scale acts
    finally:
        engine.unload_lora("style")
