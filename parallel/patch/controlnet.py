"""Make a diffusers ControlNetModel patch-parallel: each rank runs the ControlNet on its own
row band, so no rank runs a whole ControlNet.

The same layer swap as the UNet (halo convs, GroupNorms, patch self-attention), with a
context of its own: the pipeline calls the ControlNet before the UNet in every step, so the
ControlNet's step count and stale buffers must not be the UNet's. Its pre-hook cuts the
latent to the band (as the UNet's does) and the conditioning image to the same band at
pixel scale; both are held whole by every rank, so the first convs take their halo rows
from them for free. The residuals it returns are already the band's rows at every level:
exactly what the UNet, which runs on the same band, adds them to; nothing is gathered.
"""

from __future__ import annotations

import inspect

from torch import nn

from parallel.patch.attention import PatchSelfAttnProcessor
from parallel.patch.context import PatchContext
from parallel.patch.install import check_patch_aware, install_processors, swap_layers
from parallel.patch.split import cut_rows, start_step

# ControlNet forward arguments whose first dimension is the batch.
_BATCHED = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "timestep_cond", "class_labels",
            "attention_mask")


def parallelize_controlnet(controlnet: nn.Module, ctx: PatchContext) -> None:
    swap_layers(controlnet.named_modules(), ctx)
    install_processors(controlnet, lambda key, original: PatchSelfAttnProcessor(ctx, key, original))
    ctx.guards.append(lambda: check_patch_aware(controlnet.named_modules(), ctx, controlnet))
    signature = inspect.signature(controlnet.forward)
    ctx.hooks.append(controlnet.register_forward_pre_hook(_make_pre_hook(ctx, signature), with_kwargs=True))
    ctx.hooks.append(controlnet.register_forward_hook(lambda module, args, output: ctx.end_step() if ctx.enabled else None))


def _make_pre_hook(ctx: PatchContext, signature):
    def pre_hook(module, args, kwargs):
        if not ctx.enabled:
            return None
        if kwargs.get("guess_mode"):
            raise NotImplementedError("ControlNet guess_mode is not patch-parallel (it runs on the conditional half only)")
        arguments = start_step(ctx, signature, args, kwargs, _BATCHED)
        if ctx.splits_rows:
            cut_rows(ctx, arguments, "sample")
            pixels = arguments["controlnet_cond"].shape[-2] // ctx.plan.height  # rows per latent row (VAE factor)
            cut_rows(ctx, arguments, "controlnet_cond", pixels)
        return (), arguments

    return pre_hook
