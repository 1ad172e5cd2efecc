"""A chunk-causal video transformer with a per-layer KV cache (for streaming, `tpp`).

diffusers has no chunk-causal, KV-cached video transformer, so this one is built on the
Wan 2.1 transformer (`WanTransformer3DModel`): same modules, same parameter names, so a
Wan-architecture checkpoint loads into it unchanged. What changes is how it is called:

- the latent video is processed one *chunk* of `frames_per_chunk` latent frames at a time;
- self-attention is full within the chunk and causal across chunks: each layer's queries
  attend to the chunk's own keys/values and to those of earlier chunks kept in a
  `ChunkKVCache` (`CachedSelfAttnProcessor`); cross-attention to the prompt is unchanged;
- rotary positions count frames globally (`frame_offset`): chunk c's frames sit at
  c * frames_per_chunk.., computed on the fly, so a stream can be endless. Cached keys keep
  the rotation of the position they were written at, so positions stay consistent when
  chunks are evicted.

`ChunkKVCache` keeps a *rolling sink*: the first chunk written (which anchors identity and
colours) plus the last `kv_window` chunks; memory is bounded for any stream length.
"""

from __future__ import annotations

from collections import deque

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from parallel.patch.attention import attend


class ChunkKVCache:
    """Keys/values of past chunks, per layer: the sink chunk plus a rolling window."""

    def __init__(self, num_layers: int, kv_window: int):
        self.kv_window = kv_window
        self.sink: list = [None] * num_layers  # (k, v) of the first chunk, per layer
        self.window = [deque(maxlen=kv_window) for _ in range(num_layers)]
        self.staged: list = [None] * num_layers  # this chunk's (k, v) until `commit`
        self.chunks_written = 0

    def past(self, layer: int):
        """(k, v) of every cached chunk, concatenated along the sequence, or None."""
        entries = ([self.sink[layer]] if self.sink[layer] is not None else []) + list(self.window[layer])
        if not entries:
            return None
        return torch.cat([k for k, _ in entries], dim=1), torch.cat([v for _, v in entries], dim=1)

    def stage(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.staged[layer] = (key, value)

    def commit(self) -> None:
        """Write the staged chunk: the first one becomes the sink, later ones roll through the window."""
        for layer, kv in enumerate(self.staged):
            if kv is None:
                raise RuntimeError(f"layer {layer} staged no keys/values for this chunk")
            if self.sink[layer] is None:
                self.sink[layer] = kv
            elif self.kv_window > 0:
                self.window[layer].append(kv)
        self.staged = [None] * len(self.staged)
        self.chunks_written += 1

    @property
    def chunks_held(self) -> int:
        return (self.sink[0] is not None) + len(self.window[0])

    def nbytes(self) -> int:
        total = 0
        for layer in range(len(self.sink)):
            for kv in ([self.sink[layer]] if self.sink[layer] is not None else []) + list(self.window[layer]):
                total += sum(t.numel() * t.element_size() for t in kv)
        return total


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding; x: (B, L, heads, dim), cos/sin: (1, L, 1, dim)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class CachedSelfAttnProcessor:
    """Self-attention of one layer over [cached chunks; this chunk]. `cache` is set by the
    model for each call (None: no cache, plain attention within the chunk)."""

    def __init__(self, layer: int):
        self.layer = layer
        self.cache: ChunkKVCache | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("CachedSelfAttnProcessor is for unmasked self-attention")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        keys, values = key, value
        if self.cache is not None:
            past = self.cache.past(self.layer)
            if past is not None:
                keys, values = torch.cat([past[0], key], dim=1), torch.cat([past[1], value], dim=1)
            self.cache.stage(self.layer, key, value)
        return attn.to_out[1](attn.to_out[0](attend(query, keys, values)))


class GlobalFrameRotary(torch.nn.Module):
    """Wan's 3D rotary embedding with the frame axis starting at `frame_offset` (any size)."""

    def __init__(self, attention_head_dim: int, patch_size, theta: float = 10000.0):
        super().__init__()
        self.patch_size = patch_size
        self.theta = theta
        self.h_dim = self.w_dim = 2 * (attention_head_dim // 6)
        self.t_dim = attention_head_dim - self.h_dim - self.w_dim
        self.frame_offset = 0
        self._last = (None, None)  # (key, tables): every step of a chunk asks for the same tables

    def _axis(self, dim: int, positions: torch.Tensor):
        return get_1d_rotary_pos_embed(dim, positions, self.theta, use_real=True, repeat_interleave_real=True,
                                       freqs_dtype=torch.float64)

    def forward(self, hidden_states: torch.Tensor):
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        f, h, w = frames // p_t, height // p_h, width // p_w
        start = self.frame_offset // p_t
        key = (start, f, h, w, hidden_states.device)
        if self._last[0] == key:
            return self._last[1]
        parts = [self._axis(self.t_dim, torch.arange(start, start + f, dtype=torch.float64)),
                 self._axis(self.h_dim, torch.arange(h, dtype=torch.float64)),
                 self._axis(self.w_dim, torch.arange(w, dtype=torch.float64))]
        shape = [(f, 1, 1), (1, h, 1), (1, 1, w)]
        out = []
        for index in (0, 1):  # cos, sin
            grids = [p[index].view(*s, -1).expand(f, h, w, -1) for p, s in zip(parts, shape)]
            out.append(torch.cat(grids, dim=-1).reshape(1, f * h * w, 1, -1).to(hidden_states.device))
        self._last = (key, tuple(out))
        return self._last[1]


class CausalWanTransformer(WanTransformer3DModel):
    """`WanTransformer3DModel` called chunk by chunk with a KV cache (see the module doc)."""

    # No __init__ of its own: diffusers reads the constructor's signature to build the config,
    # so the parent's must stay visible. The chunk-causal parts are installed on first use.
    _cache_processors = None

    def _install_chunk_causal(self) -> None:
        self.rope = GlobalFrameRotary(self.config.attention_head_dim, self.config.patch_size)
        self._cache_processors = [CachedSelfAttnProcessor(i) for i in range(len(self.blocks))]
        for block, proc in zip(self.blocks, self._cache_processors):
            block.attn1.set_processor(proc)

    @torch.no_grad()
    def forward_chunk(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                      cache: ChunkKVCache | None, frame_offset: int, write: bool = True) -> torch.Tensor:
        """The flow prediction for one chunk (B, C, F, H, W) at `timestep`, attending to the
        chunks in `cache`; with `write` the chunk's keys/values are added to it."""
        if self._cache_processors is None:
            self._install_chunk_causal()
        self.rope.frame_offset = frame_offset
        for proc in self._cache_processors:
            proc.cache = cache
        try:
            out = self.forward(latent, timestep, text, return_dict=False)[0]
        finally:
            for proc in self._cache_processors:
                proc.cache = None
        if cache is not None:
            if write:
                cache.commit()
            else:
                cache.staged = [None] * len(cache.staged)
        return out
