"""Which keys and values a band's self-attention sees, per strategy.

Tokens are row-major, so a band of rows is a contiguous slice of the image sequence and
K/V travel as (batch, tokens, channels) with K and V concatenated on the channels.

- patch-sync / warm-up steps: the K/V of every band, fresh (all-gather, exact).
- patch: every other band's K/V from the previous step, this band's fresh (DistriFusion).
- pcpp after warm-up: this band's K/V fresh, plus only the boundary rows of each
  *adjacent* band, stale: the last `portion` of the band above and the first `portion` of
  the band below. Each rank sends its neighbours exactly those rows by point-to-point, so
  nothing a receiver does not attend to is sent. The last synchronous step already holds
  every band's K/V, so it seeds the first stale step's view without extra traffic.
"""

from __future__ import annotations

import math

import torch


def pcpp_rows(band_rows: int, portion: float) -> int:
    """Rows of a neighbouring band that PCPP attends to: a share of that band's rows,
    at least one (so thin bands at coarse levels still see across the boundary)."""
    return min(band_rows, max(1, math.ceil(portion * band_rows - 1e-9)))


def band_kv(ctx, name: str, kv: torch.Tensor) -> torch.Tensor:
    """The K/V (batch, tokens, channels) this band attends to, in row order."""
    plan, index = ctx.plan, ctx.index
    scale = plan.scale_for_tokens(index, kv.shape[1])
    cols = plan.width // scale
    if ctx.pcpp and not ctx.sync:
        return _adjacent_kv(ctx, name, kv, scale, cols)
    shapes = [torch.Size((kv.shape[0], plan.rows(j, scale) * cols, kv.shape[-1])) for j in range(plan.members)]
    parts = ctx.exchange.all_gather(name, kv, shapes, sync=ctx.sync, kind="kv")
    parts = [kv if j == index else p for j, p in enumerate(parts)]
    if ctx.seeding_pcpp:
        _seed_adjacent_view(ctx, name, parts, scale, cols)
    return torch.cat(parts, dim=1)


def _portion_tokens(ctx, band: int, scale: int, cols: int) -> int:
    return pcpp_rows(ctx.plan.rows(band, scale), ctx.layout.config.pcpp_portion) * cols


def _seed_adjacent_view(ctx, name: str, parts: list, scale: int, cols: int) -> None:
    index, last = ctx.index, ctx.members - 1
    above = parts[index - 1][:, -_portion_tokens(ctx, index - 1, scale, cols) :] if index > 0 else None
    below = parts[index + 1][:, : _portion_tokens(ctx, index + 1, scale, cols)] if index < last else None
    ctx.exchange.prime(name + ".pcpp", (above, below), kind="kv")


def _adjacent_kv(ctx, name: str, kv: torch.Tensor, scale: int, cols: int) -> torch.Tensor:
    index, last = ctx.index, ctx.members - 1
    batch, channels = kv.shape[0], kv.shape[-1]
    mine = _portion_tokens(ctx, index, scale, cols)  # what each neighbour attends to of this band
    from_prev = torch.Size((batch, _portion_tokens(ctx, index - 1, scale, cols), channels)) if index > 0 else None
    from_next = torch.Size((batch, _portion_tokens(ctx, index + 1, scale, cols), channels)) if index < last else None
    above, below = ctx.exchange.neighbours(
        name + ".pcpp",
        kv,
        to_prev=kv[:, :mine] if index > 0 else None,  # the band above attends to this band's first rows
        to_next=kv[:, kv.shape[1] - mine :] if index < last else None,  # the band below to its last rows
        from_prev_shape=from_prev,
        from_next_shape=from_next,
        sync=False,
        kind="kv",
    )
    return torch.cat([t for t in (above, kv, below) if t is not None], dim=1)
