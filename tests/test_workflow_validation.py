"""Bad add-on input (images, masks, ControlNets, adapters, schedulers) is refused on the
caller with one clear message, before any rank starts."""

import numpy as np
import pytest

from engine import ConfigError, ParallelConfig
from engine.models import describe_model
from engine.requests import build_request
from engine.workflows import check_lora
from launch.cli import main

IMG = np.zeros((64, 64, 3), np.uint8)
MASK = np.zeros((64, 64), np.uint8)


def _req(model="tiny-sd", strategy="patch", **kw):
    return build_request(describe_model(model), ParallelConfig(strategy=strategy, world_size=2), "a cat", **kw)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask_image=MASK), "mask_image needs image"),
    (dict(strength=0.5), "strength needs image"),
    (dict(image=IMG, strength=0), r"strength must be a number in \(0, 1\]"),
    (dict(image=IMG, strength=float("nan")), "strength must be"),
    (dict(image=np.zeros((64, 64, 3), np.float32)), "must be uint8"),
    (dict(image=np.zeros((64, 64, 4), np.uint8)), r"expected an \(H, W, 3\) RGB image"),
    (dict(image="/nonexistent/picture.png"), "cannot read image"),
    (dict(image=[1, 2, 3]), "must be a PIL image"),
    (dict(controlnet="tiny-controlnet"), "1 ControlNet\\(s\\) but 0 control image"),
    (dict(controlnet=["tiny-controlnet"], control_image=[IMG, IMG]), "1 ControlNet\\(s\\) but 2 control image"),
    (dict(controlnet="no-such-controlnet", control_image=IMG), "unknown controlnet"),
    (dict(controlnet="tiny-controlnet", control_image=IMG, controlnet_conditioning_scale=[1.0, 2.0]),
     "2 controlnet_conditioning_scale value"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be a number in \[0, 1\]"),
    (dict(adapters={"style": 1.0}), "adapter 'style' is not loaded"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(cross_attention_kwargs=[("scale", 1)]), "cross_attention_kwargs must be a dict"),
    (dict(scheduler="SchedulerMixin"), "not a sampler"),
    (dict(scheduler="ScoreSdeVeScheduler"), "not a sampler"),
    (dict(scheduler="FlowMatchEulerDiscreteScheduler"), "does not fit StableDiffusionPipeline"),
    (dict(scheduler="EulerDiscreteScheduler", scheduler_options={"use_karras": True}), "has no option 'use_karras'"),
    (dict(model="tiny-pixart", image=IMG), r"tiny-pixart \(PixArtSigmaPipeline\) does not run img2img"),
    (dict(model="tiny-sd3", controlnet="tiny-controlnet", control_image=IMG), "does not run controlnet"),
    (dict(model="tiny-sd3", scheduler="EulerDiscreteScheduler"), "use a FlowMatch"),
    (dict(denoising_end=0.8), "hands over between an SDXL base and refiner"),
    (dict(model="tiny-sdxl", denoising_start=0.8), "denoising_start needs image"),
    (dict(model="tiny-sdxl", denoising_end=1.0), r"denoising_end must be a number in \(0, 1\)"),
    (dict(model="tiny-sdxl", image=np.zeros((1, 16, 8, 8), np.float32), denoising_start=0.5),
     r"latents must be a finite \(batch, 4, h, w\)"),
    (dict(preview_every=-1), "callback_steps must be a positive integer"),
    (dict(ip_adapter_image=IMG), "ip_adapter_image needs an IP-Adapter"),
    (dict(image=IMG, guidance_rescale=0.5), "StableDiffusionImg2ImgPipeline does not take guidance_rescale"),
    (dict(model="tiny-sd3", cross_attention_kwargs={"scale": 0.5}), "StableDiffusion3Pipeline does not take"),
    (dict(controlnet_conditioning_scale=0.5), "controlnet_conditioning_scale needs a controlnet"),
    (dict(model="tiny-sdxl", image=np.zeros((1, 4, 8, 8), np.float32), height=128), "differ from the latents' size"),
    (dict(ip_adapter_loaded=True), "an IP-Adapter is loaded: pass ip_adapter_image"),
    (dict(preview_every=1, preview="video"), "preview must be one of latents, image"),
])
def test_bad_workflow_input_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _req(**kwargs)


def test_a_missing_optional_scheduler_dependency_is_named():
    pytest.importorskip("diffusers")
    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="LMSDiscreteScheduler needs scipy"):
            _req(scheduler="LMSDiscreteScheduler")
    else:
        _req(scheduler="LMSDiscreteScheduler")


def test_good_workflow_input_resolves_sizes_and_defaults():
    request = _req(image=np.zeros((96, 128, 3), np.uint8), mask_image=np.zeros((96, 128), np.uint8))
    assert (request.height, request.width, request.workflow, request.strength) == (96, 128, "inpaint", None)
    request = _req(image=IMG, controlnet=["tiny-controlnet"] * 2, control_image=[IMG, IMG],
                   controlnet_conditioning_scale=0.5)
    assert request.strength is None and request.controlnet_scales == (0.5, 0.5) and request.workflow == "img2img"
    # an explicit size resizes the init image and mask (img2img pipelines would keep the image's own)
    request = _req(image=np.zeros((96, 128, 3), np.uint8), mask_image=np.zeros((96, 128), np.uint8), height=64,
                   width=64)
    assert request.image.shape == (64, 64, 3) and request.mask_image.shape == (64, 64)


def test_bad_ip_adapter_is_refused_before_loading():
    from engine.workflows import check_ip_adapter

    with pytest.raises(ConfigError, match="supported on SD 1.x and SDXL"):
        check_ip_adapter("tiny-ip-adapter", 1.0, describe_model("tiny-pixart"))
    with pytest.raises(ConfigError, match="unknown IP-Adapter '/nonexistent/ip-adapter': .*not a directory, not a hub id"):
        check_ip_adapter("/nonexistent/ip-adapter", 1.0, describe_model("tiny-sd"))


def test_bad_lora_is_refused_before_loading(tmp_path):
    info = describe_model("tiny-sd")
    with pytest.raises(ConfigError, match="does not exist"):
        check_lora("style", str(tmp_path / "missing.safetensors"), 1.0, info)
    with pytest.raises(ConfigError, match="weight must be a finite number"):
        check_lora("style", {"a": 1}, float("inf"), info)
    with pytest.raises(ConfigError, match="LoRA adapters are supported on"):
        check_lora("style", {"a": 1}, 1.0, describe_model("tiny-pixart"))


@pytest.mark.parametrize("argv,message", [
    (["--mask", "m.png"], "mask_image needs image"),
    (["--controlnet", "tiny-controlnet"], "but 0 control image"),
    (["--lora", "/nonexistent/lora.safetensors:0.5"], "does not exist"),
    (["--num-images", "0"], "num_images_per_prompt must be a positive integer"),
])
def test_cli_workflow_errors_are_one_line(argv, message, capsys):
    assert main(["generate", "--model", "tiny-sd", "--nproc", "2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
