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
