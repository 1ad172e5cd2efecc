"""Cutting a denoiser call to this rank's share, and assembling the full prediction.

Shared by the UNet and transformer wrappers: the CFG half of the batch a rank serves,
and the all-gather that puts every rank's (CFG half, row band) piece back together, so
the unmodified diffusers pipeline (guidance, scheduler) runs unchanged on every rank.
"""

from __future__ import annotations

from typing import Callable

import torch


def _slice_batch(value, lo: int, hi: int, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[lo:hi]
    if isinstance(value, (list, tuple)):  # e.g. IP-Adapter image embeds: one tensor per adapter
        return type(value)(_slice_batch(v, lo, hi, batch) for v in value)
    return value


def take_cfg_half(arguments: dict, layout, batch: int, batched: tuple[str, ...], nested: tuple[str, ...] = ()) -> None:
    """Replace the batched forward arguments by this rank's half (in place). `nested` names
    dict arguments (e.g. SDXL's added_cond_kwargs) whose tensors are batched too."""
    if not layout.cfg_split:
        return
    if batch % 2:
        raise RuntimeError(f"CFG split needs an even denoiser batch, got {batch}")
    half = batch // 2
    lo, hi = layout.group_index * half, (layout.group_index + 1) * half
    for name in batched:
        if name in arguments:
            arguments[name] = _slice_batch(arguments[name], lo, hi, batch)
    for name in nested:
        if arguments.get(name):
            arguments[name] = {k: _slice_batch(v, lo, hi, batch) for k, v in arguments[name].items()}


def start_step(ctx, signature, args, kwargs, batched: tuple[str, ...]) -> dict:
    """A UNet-style model's call as this rank's step: its arguments bound by name and cut
    to this rank's CFG half (the batch is `sample`'s)."""
    ctx.begin_step()
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    take_cfg_half(arguments, ctx.layout, arguments["sample"].shape[0], batched, nested=("added_cond_kwargs",))
    return arguments


def cut_rows(ctx, arguments: dict, name: str, scale: int = 1) -> None:
    """Replace `arguments[name]` by this rank's row band (`scale` rows per latent row: 1 for
    latents, the VAE factor for a conditioning image). Every rank holds the input whole, so
    the first convs take their halo rows from it fresh (PatchContext.hold_whole)."""
    full, plan = arguments[name], ctx.plan
    band = full[:, :, plan.starts[ctx.index] * scale : plan.ends[ctx.index] * scale]
    arguments[name] = band
    ctx.hold_whole(band, full)


def gather_pieces(ctx, local: torch.Tensor, dim: int, band_size: Callable[[int], int]) -> torch.Tensor:
    """Every rank's piece assembled: bands concatenated along `dim` (band j has
    `band_size(j)` entries there), CFG halves along the batch."""
    if ctx.world_exchange is None:
        return local
    layout = ctx.layout
    members = layout.plan.members
    shapes = []
    for rank in range(ctx.topo.world_size):
        shape = list(local.shape)
        shape[dim] = band_size(rank % members if layout.cfg_split else rank)
        shapes.append(torch.Size(shape))
    parts = ctx.world_exchange.all_gather("prediction", local.contiguous(), shapes, sync=True, kind="output")
    halves = [torch.cat(parts[g * members : (g + 1) * members], dim=dim) for g in range(2 if layout.cfg_split else 1)]
    return torch.cat(halves, dim=0) if len(halves) > 1 else halves[0]
