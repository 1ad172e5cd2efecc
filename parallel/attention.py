"""Self-attention over a row band: local queries, keys/values of the whole image.

Each rank projects K and V of its own tokens only (tokens are row-major, so a band is a
contiguous slice of the sequence) and exchanges the projected K/V, never the hidden
states, so no rank recomputes others' projections. In sync steps the full K/V is
gathered fresh (exact); in stale steps the other bands' K/V come from the previous step
and the rank's own K/V is always fresh (DistriFusion). Cross-attention stays local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PatchSelfAttnProcessor:
    """Attention processor for diffusers' `Attention` (the AttnProcessor2_0 math)."""

    def __init__(self, ctx, name: str, original):
        self.ctx = ctx
        self.name = name
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        ctx = self.ctx
        if not ctx.splits_rows or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None or attn.group_norm is not None:
            raise NotImplementedError(f"{self.name}: masked or group-normed self-attention is not patch-parallel")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        key, value = self._full_kv(key, value, tokens)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, value.shape[-1] // heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _full_kv(self, key: torch.Tensor, value: torch.Tensor, tokens: int):
        """K and V of every band in row order: own fresh, others fresh (sync) or stale."""
        ctx = self.ctx
        plan, index = ctx.plan, ctx.index
        scale = plan.scale_for_tokens(index, tokens)
        kv = torch.cat([key, value], dim=-1)
        cols = plan.width // scale
        shapes = [torch.Size((kv.shape[0], plan.rows(j, scale) * cols, kv.shape[-1])) for j in range(plan.members)]
        parts = ctx.exchange.all_gather(self.name, kv, shapes, sync=ctx.sync)
        parts = [kv if j == index else p for j, p in enumerate(parts)]
        full = torch.cat(parts, dim=1)
        return full[..., : key.shape[-1]], full[..., key.shape[-1] :]
