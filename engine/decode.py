"""Latents to images, once, on the rank that returns them (never on every rank)."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """uint8 images (N, H, W, 3) from final latents, following the pipelines' own scaling."""
    vae = pipe.vae
    config = vae.config
    upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    decoder_dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        x = latents.to(device=vae.device, dtype=decoder_dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = x * std / config.scaling_factor + mean
        else:
            x = x / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        image = vae.decode(x, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
