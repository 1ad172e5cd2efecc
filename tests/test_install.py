"""Installing the patch layers: the split/gather hooks are kept and removable, and with them
removed the denoiser is the original model again."""

import torch

from comms import CommStats, Topology
from engine.models import load_pipeline
from parallel.patch.backbones import backbone_of
from parallel.patch.context import PatchContext


def test_hooks_are_removable_and_the_model_is_the_original_again():
    pipe = load_pipeline("tiny-sd", torch.device("cpu"))
    unet = pipe.unet
    sample, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(sample, t, encoder_hidden_states=text).sample
    ctx = PatchContext(Topology(0, 1, 0, torch.device("cpu")), CommStats())
    backbone_of(pipe).install(pipe, ctx)
    assert len(ctx.hooks) == 2 and unet._forward_pre_hooks and unet._forward_hooks
    ctx.remove_hooks()
    assert ctx.hooks == [] and not unet._forward_pre_hooks and not unet._forward_hooks
    with torch.no_grad():
        after = unet(sample, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def _installed(name="tiny-sd"):
    pipe = load_pipeline(name, torch.device("cpu"))
    ctx = PatchContext(Topology(0, 1, 0, torch.device("cpu")), CommStats())
    backbone_of(pipe).install(pipe, ctx)
    return pipe, ctx


def test_the_guard_names_a_conv_replaced_after_the_install():
    import pytest
    from parallel.errors import ConfigError

    pipe, ctx = _installed()
    ctx.check_installed()  # as installed: nothing to refuse
    old = pipe.unet.down_blocks[0].resnets[0].conv1
    pipe.unet.down_blocks[0].resnets[0].conv1 = torch.nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1)
    with pytest.raises(ConfigError, match=r"down_blocks\.0\.resnets\.0\.conv1 \(Conv2d\) was added or replaced"):
        ctx.check_installed()


def test_the_guard_names_an_attention_processor_replaced_after_the_install():
    import pytest
    from diffusers.models.attention_processor import AttnProcessor2_0
    from parallel.errors import ConfigError

    pipe, ctx = _installed()
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # what enabling xformers or IP-Adapter does
    with pytest.raises(ConfigError, match=r"attn1\.processor \(AttnProcessor2_0\)"):
        ctx.check_installed()


def test_the_guard_covers_dit_processors():
    import pytest
    from diffusers.models.attention_processor import AttnProcessor2_0
    from parallel.errors import ConfigError

    pipe, ctx = _installed("tiny-pixart")
    ctx.check_installed()
    pipe.transformer.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ConfigError, match=r"attn1\.processor"):
        ctx.check_installed()


def test_the_guard_refuses_dora_convs_in_training_mode():
    """peft's DoRA reuses the patch-aware base conv's output at inference; in training mode
    with dropout it convolves the band itself (zero rows at band edges), so that is refused."""
    import pytest
    from peft import LoraConfig
    from parallel.errors import ConfigError

    pipe, ctx = _installed()
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, lora_dropout=0.1, target_modules=["conv1"]))
    ctx.cover_new_layers()  # what Engine.load_lora does: peft's 3x3 lora_A becomes patch-aware
    pipe.unet.eval()  # and then this (engine.models.loading.inference_mode)
    ctx.check_installed()  # exact (tests/test_workflows.py checks DoRA on 2 ranks)
    pipe.unet.train()
    with pytest.raises(ConfigError, match=r"resnets\.0\.conv1: a DoRA adapter with dropout in training mode"):
        ctx.check_installed()


def test_every_loaded_model_runs_in_eval_mode():
    """Presets are built, not loaded, and nn.Modules start in training mode, where dropout
    (a LoRA's, peft adds its layers in training mode too) would act differently per rank."""
    from peft import LoraConfig

    from engine.models.controlnets import load_controlnet
    from engine.models.loading import inference_mode
    from engine.models.video import load_video_model

    pipe = load_pipeline("tiny-sd", torch.device("cpu"))
    assert not any(m.training for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules())
    assert not any(m.training for m in load_controlnet("tiny-controlnet", torch.device("cpu"), None).modules())
    video = load_video_model("tiny-causal-video")
    assert not any(m.training for part in (video.transformer, video.vae, video.text_encoder) for m in part.modules())
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["to_q"]))
    assert any(m.training for m in pipe.unet.modules())  # what peft adds
    inference_mode(pipe)  # what the engine does after loading adapters
    assert not any(m.training for m in pipe.unet.modules())
