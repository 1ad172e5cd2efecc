"""Self-attention over a row band: local queries, keys/values chosen by the strategy.

Each rank projects Q, K and V of its own tokens only (tokens are row-major, so a band is a
contiguous slice of the sequence) and exchanges the projected K/V, never the hidden
states, so no rank recomputes others' projections (`parallel.patch.kv` decides which bands'
K/V are seen, fresh or stale). Text tokens (joint attention) are always local and fresh.
Cross-attention stays the original processor.

Three processors, one per attention family in diffusers:
- `PatchSelfAttnProcessor`: AttnProcessor2_0 math (UNet self-attention, PixArt attn1).
- `PatchJointAttnProcessor`: JointAttnProcessor2_0 (SD3): [image; text] in one softmax.
- `PatchFluxAttnProcessor`: FluxAttnProcessor: [text; image] with rotary embeddings, in
  double-stream blocks (text passed separately) and single-stream blocks (text in front).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.patch.kv import band_kv


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel=None) -> torch.Tensor:
    """Attention on (batch, tokens, heads, head_dim) tensors; returns (batch, tokens, heads * head_dim).
    `kernel`: a (B, M, H, K) kernel chosen by `parallel.patch.kernels` (xformers), else SDPA."""
    if kernel is not None:
        return kernel(query, key, value).flatten(2).to(query.dtype)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=0.0, is_causal=False
    )
    return out.transpose(1, 2).flatten(2).to(query.dtype)


def project_qkv(attn, states: torch.Tensor, text: bool = False):
    """(query, key, value), (B, L, heads, dim), with the optional q/k norms. `text`: the
    text stream of joint attention (SD3, Flux), which has its own projections and norms."""
    q, k, v, nq, nk = (("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k") if text
                       else ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
    heads = attn.heads
    query = getattr(attn, q)(states).unflatten(-1, (heads, -1))
    key = getattr(attn, k)(states).unflatten(-1, (heads, -1))
    value = getattr(attn, v)(states).unflatten(-1, (heads, -1))
    if getattr(attn, nq) is not None:
        query = getattr(attn, nq)(query)
    if getattr(attn, nk) is not None:
        key = getattr(attn, nk)(key)
    return query, key, value


def _exchange_image_kv(ctx, name: str, key: torch.Tensor, value: torch.Tensor):
    """(batch, band tokens, heads, dim) K and V -> the K and V of the tokens attended to."""
    heads = key.shape[2]
    send = None if ctx.sync or ctx.pcpp else ctx.exchange.send_view(name)  # project straight into the bucket
    parts = [key.flatten(2), value.flatten(2)]
    kv = torch.cat(parts, dim=-1, out=send) if send is not None else torch.cat(parts, dim=-1)
    full = band_kv(ctx, name, kv)
    split = key.shape[2] * key.shape[3]
    return full[..., :split].unflatten(-1, (heads, -1)), full[..., split:].unflatten(-1, (heads, -1))


class _PatchProcessor:
    def __init__(self, ctx, name: str, original):
        self.ctx = ctx
        self.name = name
        self.original = original


def is_patch_processor(processor) -> bool:
    """Whether `processor` is one of the patch-aware processors (of any model family)."""
    return isinstance(processor, _PatchProcessor)


class PatchSelfAttnProcessor(_PatchProcessor):
    """For diffusers' `Attention` run by AttnProcessor2_0 (self-attention only)."""

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

        query, key, value = project_qkv(attn, hidden_states)
        key, value = _exchange_image_kv(ctx, self.name, key, value)

        out = attend(query, key, value, self.ctx.attention_kernel)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PatchJointAttnProcessor(_PatchProcessor):
    """For SD3's joint attention: image queries and keys of the band, text ones whole."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        ctx = self.ctx
        if not ctx.splits_rows:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: masked joint attention is not patch-parallel")

        query, key, value = project_qkv(attn, hidden_states)
        key, value = _exchange_image_kv(ctx, self.name, key, value)

        image_tokens = hidden_states.shape[1]
        if encoder_hidden_states is not None:  # [image; text], as the serial processor orders them
            text_q, text_k, text_v = project_qkv(attn, encoder_hidden_states, text=True)
            query = torch.cat([query, text_q], dim=1)
            key = torch.cat([key, text_k], dim=1)
            value = torch.cat([value, text_v], dim=1)

        out = attend(query, key, value, self.ctx.attention_kernel)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


class PatchFluxAttnProcessor(_PatchProcessor):
    """For Flux's attention. Rotary embeddings are applied before the exchange, so every
    key carries its own global position (the rank's rotary table covers its band only)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        ctx = self.ctx
        if not ctx.splits_rows:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: masked attention is not patch-parallel")
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value = project_qkv(attn, hidden_states)
        if encoder_hidden_states is not None:  # double-stream block: [text; image]
            text_tokens = encoder_hidden_states.shape[1]
            text_q, text_k, text_v = project_qkv(attn, encoder_hidden_states, text=True)
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        else:  # single-stream block: the text tokens are already in front
            text_tokens = ctx.text_tokens
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        image_k, image_v = _exchange_image_kv(ctx, self.name, key[:, text_tokens:], value[:, text_tokens:])
        key = torch.cat([key[:, :text_tokens], image_k], dim=1)
        value = torch.cat([value[:, :text_tokens], image_v], dim=1)
        out = attend(query, key, value, self.ctx.attention_kernel)
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :text_tokens], out[:, text_tokens:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())
