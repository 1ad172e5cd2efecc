"""Make a diffusers UNet2DConditionModel patch-parallel, by composition.

- Convs that cross band boundaries and every GroupNorm have their class swapped to the
  patch-aware versions (weights, names and state_dict keys are untouched).
- Self-attention gets a patch-aware attention processor.
- A forward pre-hook cuts the UNet input to this rank's CFG half (batch) and row band;
  a forward hook gathers every rank's output band back into the full prediction
  (`parallel.patch.split`), so the unmodified diffusers pipeline runs unchanged on every rank.

Nothing here is specific to a diffusers version beyond the public module classes and
`set_attn_processor`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from parallel.patch.attention import PatchSelfAttnProcessor
from parallel.patch.context import PatchContext
from parallel.patch.install import check_patch_aware, install_processors, swap_layers
from parallel.patch.split import cut_rows, gather_pieces, start_step

# UNet forward arguments whose first dimension is the batch.
_BATCHED = ("sample", "encoder_hidden_states", "timestep_cond", "class_labels", "attention_mask", "encoder_attention_mask")


def downsampling_factor(unet) -> int:
    """How many latent rows collapse into one row at the UNet's coarsest level."""
    return 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def parallelize_unet(unet: nn.Module, ctx: PatchContext) -> None:
    swap_layers(unet.named_modules(), ctx)
    install_processors(unet, lambda key, original: PatchSelfAttnProcessor(ctx, key, original))
    ctx.guards.append(lambda: check_patch_aware(unet.named_modules(), ctx, unet))

    def cover_new_layers():  # e.g. peft's LoRA convs, an IP-Adapter's rebuilt processors
        swap_layers(unet.named_modules(), ctx)
        install_processors(unet, lambda key, original: PatchSelfAttnProcessor(ctx, key, original))

    ctx.cover_new_layers = cover_new_layers
    signature = inspect.signature(unet.forward)
    ctx.hooks.append(unet.register_forward_pre_hook(_make_pre_hook(ctx, signature), with_kwargs=True))
    ctx.hooks.append(unet.register_forward_hook(_make_post_hook(ctx), with_kwargs=True))


def _make_pre_hook(ctx: PatchContext, signature):
    def pre_hook(module, args, kwargs):
        if not ctx.enabled:
            return None
        arguments = start_step(ctx, signature, args, kwargs, _BATCHED + ("timestep",))
        if ctx.splits_rows:
            cut_rows(ctx, arguments, "sample")  # conv_in's halo comes fresh from the whole latent
        return (), arguments

    return pre_hook


def _make_post_hook(ctx: PatchContext):
    def post_hook(module, args, kwargs, output):
        if not ctx.enabled:
            return None
        local = output[0] if isinstance(output, tuple) else output.sample
        full = gather_prediction(ctx, local)
        ctx.end_step()
        if isinstance(output, tuple):
            return (full,) + tuple(output[1:])
        output.sample = full
        return output

    return post_hook


def gather_prediction(ctx: PatchContext, local: torch.Tensor) -> torch.Tensor:
    """Every rank's (CFG half, row band) of the prediction, assembled into the full tensor."""
    return gather_pieces(ctx, local, dim=2, band_size=ctx.layout.plan.rows)
