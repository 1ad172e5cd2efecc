"""Make a diffusers transformer (DiT) patch-parallel, by composition.

The image token sequence is sharded by rows of tokens *after* the patch and positional
embedding, so every token keeps its global position:
- PixArt, SD3: the patch embedding runs on the full latent (cheap) and a hook on it keeps
  this rank's band of tokens.
- Flux: the pipeline packs the latent into tokens itself; the forward pre-hook slices the
  tokens and `img_ids`, so the rotary table the model builds covers this band's global
  positions only.
Self-attention gets a patch-aware processor (K/V of other bands per strategy; text K/V
always local and fresh). Every other layer is token-local, so nothing else changes. A hook
on the final projection gathers every rank's (CFG half, band) tokens, so unpatchify and
the pipeline see the full prediction.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from parallel.patch.attention import PatchFluxAttnProcessor, PatchJointAttnProcessor, PatchSelfAttnProcessor
from parallel.patch.context import PatchContext
from parallel.patch.install import check_patch_aware, install_processors
from parallel.patch.split import gather_pieces, take_cfg_half

# Transformer forward arguments whose first dimension is the batch (any of the three).
_BATCHED = (
    "hidden_states", "encoder_hidden_states", "timestep", "pooled_projections", "guidance", "encoder_attention_mask",
)

# Self-attention processors this module can replace, by the original processor's class.
_PROCESSORS = {
    "AttnProcessor2_0": PatchSelfAttnProcessor,
    "JointAttnProcessor2_0": PatchJointAttnProcessor,
    "FluxAttnProcessor": PatchFluxAttnProcessor,
}


def token_scale(model: nn.Module) -> int:
    """Latent rows per row of image tokens: the patch size (Flux: its pipeline's 2x2 packing)."""
    return 2 if type(model).__name__ == "FluxTransformer2DModel" else int(model.config.patch_size)


def parallelize_transformer(model: nn.Module, ctx: PatchContext) -> None:
    packed = type(model).__name__ == "FluxTransformer2DModel"  # input is already tokens
    _install_processors(model, ctx)
    ctx.guards.append(lambda: check_patch_aware((), ctx, model))  # token-local layers need no swap
    signature = inspect.signature(model.forward)
    ctx.hooks.append(model.register_forward_pre_hook(_make_pre_hook(ctx, signature, packed), with_kwargs=True))
    if not packed:
        ctx.hooks.append(model.pos_embed.register_forward_hook(_make_band_tokens_hook(ctx)))
    ctx.hooks.append(model.proj_out.register_forward_hook(_make_gather_hook(ctx, token_scale(model))))
    ctx.hooks.append(model.register_forward_hook(lambda module, args, output: ctx.end_step() if ctx.enabled else None))


def _install_processors(model: nn.Module, ctx: PatchContext) -> None:
    def wrap(key, processor):
        cls = _PROCESSORS.get(type(processor).__name__)
        if cls is None:
            raise NotImplementedError(
                f"{key}: attention processor {type(processor).__name__} is not patch-parallel "
                f"(supported: {', '.join(_PROCESSORS)})"
            )
        return cls(ctx, key, processor)

    install_processors(model, wrap)


def _band_tokens(ctx: PatchContext, scale: int) -> tuple[int, int]:
    plan, index = ctx.plan, ctx.index
    cols = plan.width // scale
    return plan.starts[index] // scale * cols, plan.ends[index] // scale * cols


def _make_pre_hook(ctx: PatchContext, signature, packed: bool):
    def pre_hook(module, args, kwargs):
        if not ctx.enabled:
            return None
        ctx.begin_step()
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        take_cfg_half(arguments, ctx.layout, arguments["hidden_states"].shape[0], _BATCHED, nested=("added_cond_kwargs",))
        if packed:
            ctx.text_tokens = arguments["encoder_hidden_states"].shape[1]
            if ctx.splits_rows:
                lo, hi = _band_tokens(ctx, 2)
                arguments["hidden_states"] = arguments["hidden_states"][:, lo:hi]
                ids = arguments["img_ids"]
                arguments["img_ids"] = ids[..., lo:hi, :]  # 2-D (tokens, 3) or deprecated 3-D
        return (), arguments

    return pre_hook


def _make_band_tokens_hook(ctx: PatchContext):
    def hook(module, args, output):
        if not ctx.splits_rows:
            return None
        lo, hi = _band_tokens(ctx, int(module.patch_size))
        return output[:, lo:hi]

    return hook


def _make_gather_hook(ctx: PatchContext, scale: int):
    def hook(module, args, output: torch.Tensor):
        if not ctx.enabled:
            return None
        plan = ctx.plan
        return gather_pieces(ctx, output, dim=1, band_size=lambda j: plan.rows(j, scale) * (plan.width // scale))

    return hook
