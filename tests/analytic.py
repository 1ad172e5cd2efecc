"""First-principles byte counts that the reported per-step bytes must match."""

from __future__ import annotations

import math

import torch

from engine.models import pipeline_call_kwargs
from parallel.patch.attention import _PatchProcessor
from parallel.patch.kv import pcpp_rows


def kv_layers(pipe, height: int, width: int, prompt: str = "x", guidance_scale: float = 5.0):
    """(batch, scale, K+V bytes per token) of every patch-parallel self-attention layer,
    recorded from one serial step. `scale` is latent rows per row of tokens."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    vae = pipe.vae_scale_factor
    H, W = height // vae, width // vae
    fixed_scale = None if getattr(pipe, "unet", None) is not None else _token_scale(denoiser)
    layers, handles = [], []
    for key, proc in denoiser.attn_processors.items():
        if not isinstance(proc, _PatchProcessor):
            continue
        attn = denoiser.get_submodule(key.rsplit(".processor", 1)[0])
        per_token = (attn.to_k.out_features + attn.to_v.out_features) * 4  # float32

        def hook(module, args, kwargs, per_token=per_token):
            hidden = args[0] if args else kwargs["hidden_states"]
            scale = fixed_scale or math.isqrt(H * W // hidden.shape[1])
            layers.append((hidden.shape[0], scale, per_token))

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        pipe(prompt=prompt, height=height, width=width, num_inference_steps=1, guidance_scale=guidance_scale,
             generator=torch.Generator().manual_seed(0), output_type="latent", **pipeline_call_kwargs(pipe))
    finally:
        for h in handles:
            h.remove()
    return layers


def _token_scale(model) -> int:
    from parallel.patch.dit import token_scale

    return token_scale(model)


def kv_bytes(layers, plan, rank: int, portion: float | None = None) -> tuple[int, int]:
    """K/V bytes one rank sends and receives in one step: every band's K/V to every other
    member (`patch`, warm-up), or only the `portion` boundary rows to and from the
    adjacent bands (`pcpp` after warm-up)."""
    n, last = plan.members, plan.members - 1
    sent = received = 0
    for batch, scale, per_token in layers:
        cols = plan.width // scale
        row = batch * cols * per_token
        rows = [plan.rows(j, scale) for j in range(n)]
        if portion is None:
            sent += row * rows[rank] * (n - 1)
            received += row * sum(rows[j] for j in range(n) if j != rank)
            continue
        mine = pcpp_rows(rows[rank], portion)
        sent += row * mine * ((rank > 0) + (rank < last))
        if rank > 0:
            received += row * pcpp_rows(rows[rank - 1], portion)
        if rank < last:
            received += row * pcpp_rows(rows[rank + 1], portion)
    return sent, received
