"""Parallel VAE decode: every rank decodes a row band of the latent, exactly.

The decoder of a diffusers `AutoencoderKL` (and its post_quant_conv) is made band-aware
by composition, like the UNet in `parallel/patch/unet.py`, with its own `PatchContext` (not the
denoiser's), always in the exact configuration (`patch-sync`, one group of all ranks):

- 3x3 convs become `HaloConv2d`: one row from each neighbour at that level's resolution.
  The decoder upsamples 2x per up block, so the band's scale there is a Fraction
  (`BandPlan.scale_for_rows`); band heights times 2^k add up to the serial height.
- GroupNorms (resnets, conv_norm_out and the attention's own group_norm) become
  `PatchGroupNorm`: band statistics all-gathered, pooled variance (exact).
- The mid-block self-attention gets `DecodeSelfAttnProcessor`: local queries, K/V of
  every band gathered fresh in row order.
- Nearest upsampling, 1x1 convs, activations and linear layers are row-local.

Latent rows are the unit of the bands (align 1: the decoder never downsamples), and the
image band of a rank is its latent band times the VAE scale factor. Without an active
decode (the context disabled) every swapped layer is exactly the original, so serial
decode keeps working on the same modules.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.patch.attention import attend, project_qkv
from parallel.patch.context import PatchContext
from parallel.patch.install import swap_layers


class DecodeSelfAttnProcessor:
    """AttnProcessor2_0's math for the VAE's self-attention (group_norm, residual
    connection) over a row band, with the K/V of all bands gathered fresh."""

    def __init__(self, ctx: PatchContext, name: str, original):
        self.ctx = ctx
        self.name = name
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        ctx = self.ctx
        if not ctx.splits_rows or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None or hidden_states.ndim != 4:
            raise NotImplementedError(f"{self.name}: masked or sequence-shaped VAE attention is not band-parallel")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:  # a PatchGroupNorm: global statistics
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = project_qkv(attn, hidden_states)  # (batch, band tokens, heads, dim)
        heads = query.shape[2]
        key, value = self._full_kv(key.flatten(2), value.flatten(2), height, width)
        out = attend(query, key.unflatten(-1, (heads, -1)), value.unflatten(-1, (heads, -1)), ctx.attention_kernel)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _full_kv(self, key: torch.Tensor, value: torch.Tensor, height: int, width: int):
        """K and V of every band in row order (all fresh: decode is synchronous)."""
        ctx = self.ctx
        plan, index = ctx.plan, ctx.index
        scale = plan.scale_for_rows(index, height)  # 1 in the mid block; exact at any level
        kv = torch.cat([key, value], dim=-1)
        shapes = [torch.Size((kv.shape[0], plan.rows(j, scale) * width, kv.shape[-1])) for j in range(plan.members)]
        parts = ctx.exchange.all_gather(self.name, kv, shapes, sync=True, kind="kv")
        parts = [kv if j == index else p for j, p in enumerate(parts)]
        full = torch.cat(parts, dim=1)
        return full[..., : key.shape[-1]], full[..., key.shape[-1] :]


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor")  # diffusers Attention


def parallelize_vae(vae: nn.Module, ctx: PatchContext) -> None:
    """Swap the band-aware layers into `vae.decoder` and `vae.post_quant_conv` (the
    encoder is untouched). `ctx` must be a PatchContext of its own, used only by
    `engine.runtime.decode.decode_float_parallel`. Raises NotImplementedError, before changing
    anything, on a decoder it cannot split (callers then decode serially)."""
    if getattr(vae, "_tessera_decode_ctx", None) is not None:
        raise RuntimeError("this VAE is already parallelized")
    decoder = getattr(vae, "decoder", None)
    if decoder is None or not isinstance(getattr(decoder, "conv_norm_out", None), nn.GroupNorm):
        # e.g. AutoencoderTiny, or SpatialNorm decoders (MoVQ)
        raise NotImplementedError(
            f"{type(vae).__name__}: only GroupNorm AutoencoderKL-style decoders are band-parallel"
        )
    modules = [("decoder." + n, m) for n, m in decoder.named_modules()]
    if getattr(vae, "post_quant_conv", None) is not None:
        modules.append(("post_quant_conv", vae.post_quant_conv))
    for name, module in modules:
        if _is_attention(module) and getattr(module, "is_cross_attention", False):
            raise NotImplementedError(f"{name}: cross-attention in a VAE decoder")
    swap_layers(modules, ctx, stride_one=True)  # incl. the attention's own group_norm
    for name, module in modules:
        if _is_attention(module):
            module.set_processor(DecodeSelfAttnProcessor(ctx, name + ".processor", module.processor))
    vae._tessera_decode_ctx = ctx
