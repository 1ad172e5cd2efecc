"""Tiles of an ASG high-resolution latent: native-size windows with overlap.

A latent of (H, W) rows/columns is covered by tiles of the model's native latent size
(h, w). Along each axis the tiles start at evenly spread offsets, at most `h - overlap`
apart, the first at 0 and the last flush with the edge, so every latent row is covered and
neighbouring tiles share at least `overlap` rows. `weights()` counts how many tiles cover
each position: averaging the tiles' predictions is dividing their sum by it
(MultiDiffusion). Tiles are dealt to ranks in contiguous runs of row-major order, so a rank
owns a compact region and shares overlap strips only with ranks next to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parallel.config import ConfigError


def _starts(total: int, size: int, overlap: int) -> list[int]:
    if total == size:
        return [0]
    count = math.ceil((total - overlap) / (size - overlap))
    step = (total - size) / (count - 1)
    return [round(i * step) for i in range(count)]


@dataclass(frozen=True)
class TileGrid:
    height: int  # latent rows of the high-resolution latent
    width: int
    tile_h: int  # latent rows of one tile (the model's native latent size)
    tile_w: int
    overlap: int  # minimum shared rows/columns between neighbouring tiles

    @classmethod
    def cover(cls, height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> "TileGrid":
        """Check the geometry and build the grid; errors say what to change."""
        if height < tile_h or width < tile_w:
            raise ConfigError(
                f"asg: the target latent {height}x{width} is smaller than the model's native "
                f"{tile_h}x{tile_w}; ask for at least the native size")
        if not isinstance(overlap, int) or overlap < 0:
            raise ConfigError(f"asg_tile_overlap must be a non-negative integer (latent rows), got {overlap!r}")
        if overlap >= min(tile_h, tile_w):
            raise ConfigError(
                f"asg_tile_overlap {overlap} must be smaller than a tile ({tile_h}x{tile_w} latent): "
                "tiles that overlap completely never advance across the latent")
        return cls(height, width, tile_h, tile_w, overlap)

    @property
    def tiles(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row-major."""
        return [(y, x) for y in _starts(self.height, self.tile_h, self.overlap)
                for x in _starts(self.width, self.tile_w, self.overlap)]

    def window(self, tile: tuple[int, int]) -> tuple[slice, slice]:
        y, x = tile
        return slice(y, y + self.tile_h), slice(x, x + self.tile_w)

    def weights(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(H, W): how many tiles cover each latent position (>= 1 everywhere)."""
        count = torch.zeros(self.height, self.width, device=device, dtype=dtype)
        for tile in self.tiles:
            count[self.window(tile)] += 1
        return count

    def assign(self, ranks: int) -> list[list[tuple[int, int]]]:
        """Tiles per rank: contiguous runs of row-major order, sizes differing by at most one."""
        tiles = self.tiles
        if ranks > len(tiles):
            raise ConfigError(f"asg: {ranks} tile ranks but only {len(tiles)} tiles; use fewer ranks "
                              "or a larger target")
        base, extra = divmod(len(tiles), ranks)
        out, start = [], 0
        for r in range(ranks):
            n = base + (r < extra)
            out.append(tiles[start:start + n])
            start += n
        return out


def positions(mask: torch.Tensor, device) -> torch.Tensor:
    """Flat indices of a boolean mask's True entries, on `device`. Exchanges gather and
    scatter by these, made once per request: a boolean mask would sync a GPU on every
    gather, a CPU index would be copied to it on every step."""
    return mask.flatten().nonzero().squeeze(1).to(device)


def view_index(height: int, width: int, native: tuple[int, int]) -> torch.Tensor:
    """Flat (row * width + column) indices of the latent positions a nearest-neighbour
    downsampling to `native` picks, in row-major order of the native grid. Built with
    F.interpolate itself, so it picks exactly what the single-process branch sees."""
    import torch.nn.functional as F

    flat = torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width)
    return F.interpolate(flat, size=native, mode="nearest").flatten().long()


@dataclass
class TilePlan:
    """What one tile rank exchanges in a parallel ASG step, from the geometry alone (every
    rank builds the same plan, so receive sizes need no handshake).

    - `shared[s]`: positions covered by both this rank's tiles and tile rank s's: the overlap
      strips whose partial sums the two ranks swap so each completes the average over its
      own region.
    - `view_covered[s]`: which of the branch's view pixels tile rank s covers (it sends its
      partial sums there, so every tile rank knows the averaged prediction on the branch's
      grid, which the guidance needs just outside its own region too).
    - `view_owned[s]`: the view pixels tile rank s sends the branch (each pixel by the lowest
      rank covering it), from which the branch assembles its global view.
    """

    grid: TileGrid
    tile_ranks: int
    index: int  # this rank's place among the tile ranks
    covers: list  # per tile rank: (H, W) bool
    view: torch.Tensor  # flat indices of the branch's view pixels
    _view_owned: list | None = None

    @classmethod
    def build(cls, grid: TileGrid, tile_ranks: int, index: int) -> "TilePlan":
        covers = []
        for tiles in grid.assign(tile_ranks):
            cover = torch.zeros(grid.height, grid.width, dtype=torch.bool)
            for tile in tiles:
                cover[grid.window(tile)] = True
            covers.append(cover)
        plan = cls(grid, tile_ranks, index, covers, view_index(grid.height, grid.width, (grid.tile_h, grid.tile_w)))
        for rank in range(tile_ranks):  # every rank then swaps view sums with every other: no one-sided P2P
            if not bool(plan.view_covered(rank).any()):
                raise ConfigError(f"asg: tile rank {rank} covers none of the structure branch's pixels "
                                  f"({grid.height}x{grid.width} latent, {grid.tile_h}x{grid.tile_w} tiles); "
                                  "use fewer ranks or a smaller target")
        return plan

    @property
    def region(self) -> torch.Tensor:
        return self.covers[self.index]

    def shared(self, peer: int) -> torch.Tensor:
        return self.covers[self.index] & self.covers[peer]

    def view_covered(self, rank: int) -> torch.Tensor:
        return self.covers[rank].flatten()[self.view]

    def view_owned(self, rank: int) -> torch.Tensor:
        """Which view pixels tile rank `rank` sends the branch (computed once per plan:
        both sides ask every step)."""
        if self._view_owned is None:
            owned, earlier = [], torch.zeros_like(self.view, dtype=torch.bool)
            for r in range(self.tile_ranks):
                covered = self.view_covered(r)
                owned.append(covered & ~earlier)
                earlier |= covered
            self._view_owned = owned
        return self._view_owned[rank]

    def strip_indices(self, device) -> dict:
        """The index tensors of `comms.asg_channel.StripExchange` for this rank."""
        peers = [s for s in range(self.tile_ranks) if s != self.index]
        return dict(view=self.view.to(device),
                    shared={s: positions(self.shared(s), device) for s in peers},
                    view_mine=self.view[self.view_covered(self.index)].to(device),
                    view_theirs={s: positions(self.view_covered(s), device) for s in peers})

    def branch_indices(self, device) -> dict:
        """The index tensors of `comms.asg_channel.BranchChannel` for this rank."""
        owned = [(self.view[self.view_owned(r)].to(device), positions(self.view_owned(r), device))
                 for r in range(self.tile_ranks)]
        return dict(branch=self.tile_ranks, view_size=self.view.numel(), owned=owned, mine=owned[self.index][0])

    def owned(self, rank: int) -> torch.Tensor:
        """(H, W): positions whose final value tile rank `rank` contributes (lowest rank covering)."""
        earlier = torch.zeros_like(self.covers[0])
        for r in range(rank):
            earlier |= self.covers[r]
        return self.covers[rank] & ~earlier
