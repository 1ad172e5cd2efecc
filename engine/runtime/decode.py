"""Latents to images: serially on one rank, or in row bands on every rank of the world.

Both paths share the pipelines' own scaling (latents_mean/std or scaling_factor and
shift_factor) and float16 `force_upcast` handling; the parallel one decodes this rank's
band of latent rows with the band-aware decoder of `parallel/patch/vae.py` and gathers the
image bands, so it equals the serial decode up to float reassociation.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from parallel.config import ParallelConfig


@contextmanager
def _decoder_dtype(vae):
    """The dtype the decoder runs in: float32 for float16 VAEs that ask for it
    (`force_upcast`, the VAE is cast for the duration), else the VAE's own."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield torch.float32 if upcast else vae.dtype
    finally:
        if upcast:
            vae.to(torch.float16)


def _unscale(vae, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Final latents to the decoder's input (elementwise, so a row band unscales alone)."""
    config = vae.config
    x = latents.to(device=vae.device, dtype=dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return x * std / config.scaling_factor + mean
    return x / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


def unit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) to uint8, rounded to the nearest level."""
    return (np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Decoder output (N, 3, H, W) in [-1, 1] to uint8 images (N, H, W, 3)."""
    return unit_to_uint8((image.float() / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def decode_float(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The decoder's output (N, 3, H, W) for final latents, serially on this rank."""
    vae = pipe.vae
    with _decoder_dtype(vae) as dtype:
        return vae.decode(_unscale(vae, latents, dtype), return_dict=False)[0]


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """uint8 images (N, H, W, 3) from final latents, following the pipelines' own scaling."""
    return to_uint8(decode_float(pipe, latents))


@torch.no_grad()
def decode_float_parallel(pipe, latents: torch.Tensor, ctx) -> torch.Tensor:
    """The full decoder output on every rank, each rank decoding one row band.

    `latents` is the full (N, C, H, W) latent, the same on every rank; `ctx` is the decode
    PatchContext that `parallel.patch.vae.parallelize_vae` installed on `pipe.vae`. Collective:
    every rank of the world must call it with the same latent shape.
    """
    vae = pipe.vae
    if getattr(vae, "_tessera_decode_ctx", None) is not ctx:
        raise RuntimeError("decode_float_parallel needs a VAE parallelized with this context (parallelize_vae)")
    if latents.ndim != 4:
        raise ValueError(
            f"parallel decode needs (B, C, H, W) latents, got {tuple(latents.shape)} (unpack packed latents first)"
        )
    rows, cols = latents.shape[-2:]
    # Fewer latent rows than ranks (or diffusers' own tiled decode, whose tiles would be
    # cut by the bands): fall back to a serial decode on every rank rather than fail after
    # the denoising already ran. Every rank takes the same branch (same shape, same model).
    if not ctx.topo.distributed or rows < ctx.topo.world_size or getattr(vae, "use_tiling", False):
        return decode_float(pipe, latents)
    ctx.begin_request(ParallelConfig(strategy="patch-sync"), rows, cols, align=1, cfg_split=False)
    try:
        ctx.begin_step()
        plan, index = ctx.plan, ctx.index
        start, end = plan.starts[index], plan.ends[index]
        with _decoder_dtype(vae) as dtype:
            band = vae.decode(_unscale(vae, latents[:, :, start:end], dtype), return_dict=False)[0].contiguous()
        factor, rest = divmod(band.shape[-2], end - start)
        if rest or band.shape[-1] != cols * factor:
            raise RuntimeError(f"decoder output {tuple(band.shape)} is not latent band {end - start}x{cols} upscaled")
        n, c, _, width = band.shape
        shapes = [torch.Size((n, c, plan.rows(j) * factor, width)) for j in range(plan.members)]
        parts = ctx.exchange.all_gather("vae.image", band, shapes, sync=True, kind="output")
        parts = [band if j == index else p for j, p in enumerate(parts)]
        return torch.cat(parts, dim=2)
    finally:
        ctx.end_request()


@torch.no_grad()
def decode_latents_parallel(pipe, latents: torch.Tensor, ctx) -> np.ndarray:
    """uint8 images (N, H, W, 3) on every rank, decoded in row bands across the world."""
    return to_uint8(decode_float_parallel(pipe, latents, ctx))
