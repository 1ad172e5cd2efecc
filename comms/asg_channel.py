"""ASG traffic: overlap strips between tile ranks, view pixels to the branch rank, the
branch's guidance back, and the final latent.

Everything here works on flat index tensors over the last two dimensions (which positions
to swap with whom, which to send): the geometry that decides them is the caller's
(`parallel.asg.tiles.TilePlan.strip_indices` / `branch_indices`).

- `StripExchange` (tile ranks only): each tile rank has summed the predictions of its own
  tiles; it swaps the partial sums on the positions it shares with another tile rank (the
  overlap strips, nothing else), so each completes the average over its own region. On
  guided steps the same message carries its partial sums on the branch's view pixels, so
  every tile rank also knows the averaged prediction on the branch's grid.
- `BranchChannel` (a side group, so that a slow branch never blocks the strips on NCCL's
  in-order streams): tile ranks send the view pixels they own to the branch rank
  asynchronously; the branch rank broadcasts its guidance (prediction + mask, one flat
  tensor) asynchronously, and tile ranks wait on it only when they apply it (a step later
  with staleness 1). The time spent in that wait is the rank's guidance wait.
- `assemble_latents`: after the last step every tile rank contributes the final latent on
  the positions it owns; one all-reduce gives every rank the whole latent to decode.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import comms.wire as wire
from comms.stats import nbytes

STRIP_TAG = 7101
VIEW_TAG = 7102


class StripExchange:
    """Swaps partial sums with peers. Index tensors (flat, on the compute device, made once
    per request: a boolean mask would sync a GPU on every gather):
    - `view`: the positions of the view pixels (the branch's grid), in view order;
    - `shared[peer]`: positions this rank and `peer` both hold;
    - `view_mine`: the positions of the view pixels this rank holds;
    - `view_theirs[peer]`: the places in the view of the pixels `peer` holds."""

    def __init__(self, view, shared: dict, view_mine, view_theirs: dict, stats, group=None):
        self.stats, self.group = stats, group
        self.peers = list(shared)
        self.view, self.shared, self.view_mine, self.view_theirs = view, shared, view_mine, view_theirs

    def complete(self, partial: torch.Tensor, with_view: bool):
        """(the averaged-region sum, the full sum on the view pixels (B, C, n) or None)."""
        partial = partial.contiguous()
        lead = partial.shape[:-2]
        flat = partial.flatten(-2)  # a view: adding into it adds into `partial`
        down = flat[..., self.view].clone() if with_view else None  # own share, before the strips
        ops, received, sent, recvs = [], 0, 0, {}
        for s in self.peers:
            strip = self.shared[s].numel()
            theirs = self.view_theirs[s].numel() if with_view else 0
            if strip + theirs == 0:
                continue
            parts = [flat[..., self.shared[s]]]
            if with_view:
                parts.append(flat[..., self.view_mine])
            message = torch.cat(parts, dim=-1).contiguous()
            buf = partial.new_empty(*lead, strip + theirs)
            ops += [("send", message, s, STRIP_TAG), ("recv", buf, s, STRIP_TAG)]
            sent += nbytes(message)
            received += nbytes(buf)
            recvs[s] = (buf, strip)
        if not ops:
            return partial, down
        self.stats.record_op(sent, received, ops=len(ops), kind="tiles")
        with self.stats.waiting(partial.device):
            for work in wire.batch_p2p(ops, self.group):
                work.wait()
        for s, (buf, strip) in recvs.items():
            flat[..., self.shared[s]] += buf[..., :strip]
            if with_view:
                down[..., self.view_theirs[s]] += buf[..., strip:]
        return partial, down


class BranchChannel:
    """Tile ranks 0..n-1 and the branch rank n. `owned[r]`: (the positions of the view pixels
    tile rank r sends, their places in the view); `mine`: this rank's positions to send."""

    def __init__(self, branch: int, view_size: int, owned: list, mine, stats, group=None):
        self.branch = branch
        self.rank = dist.get_rank()
        self.stats, self.group = stats, group
        self.world = dist.get_world_size(group)
        self.inflight: list = []  # sends and broadcasts to finish before the request ends
        self.view_size = view_size
        self.owned, self.mine = owned, mine

    def send_view(self, sample: torch.Tensor) -> None:
        """Tile rank: start sending its own view pixels of `sample` to the branch rank."""
        positions = self.mine
        if positions.numel() == 0:
            return
        values = sample.flatten(-2)[..., positions].contiguous()
        self.stats.record_op(nbytes(values), 0, kind="view")
        self.inflight.append((values, wire.isend(values, self.branch, self.group, VIEW_TAG)))

    def gather_view(self, sample: torch.Tensor, native: tuple[int, int]) -> torch.Tensor:
        """Branch rank: receive every tile rank's view pixels; (B, C, h, w)."""
        view = sample.new_zeros(*sample.shape[:-2], self.view_size)
        pending = []
        for r, (_, owned) in enumerate(self.owned):
            if owned.numel() == 0:
                continue
            buf = sample.new_empty(*sample.shape[:-2], owned.numel())
            self.stats.record_op(0, nbytes(buf), kind="view")
            pending.append((owned, buf, wire.irecv(buf, r, self.group, VIEW_TAG)))
        with self.stats.waiting(sample.device):
            for owned, buf, work in pending:
                work.wait()
                view[..., owned] = buf
        return view.view(*sample.shape[:-2], *native)

    def post(self, numel: int, dtype, device, guidance: torch.Tensor | None = None):
        """Start the broadcast of one step's guidance (the branch passes it, others None)."""
        if self.rank == self.branch:
            buf = guidance.contiguous()
        else:
            buf = torch.empty(numel, dtype=dtype, device=device)
        size = nbytes(buf)
        sent, received = (size * (self.world - 1), 0) if self.rank == self.branch else (0, size)
        self.stats.record_op(sent, received, kind="guidance")
        posted = (buf, wire.broadcast(buf, src=self.branch, group=self.group, async_op=True))
        if self.rank == self.branch:
            self.inflight.append(posted)
        return posted

    def wait(self, posted) -> tuple[torch.Tensor, float]:
        """(the guidance, seconds the host waited for it). On CUDA the wait is the compute
        stream's, not the host's (no synchronisation per step): its length is measured with
        events and lands in the rank's comm_wait_s when the request ends."""
        buf, work = posted
        start = time.perf_counter()
        with self.stats.waiting(buf.device):
            work.wait()
        return buf, time.perf_counter() - start

    def finish(self) -> None:
        for _, work in self.inflight:
            work.wait()
        self.inflight.clear()


def assemble_latents(latents: torch.Tensor, owned: torch.Tensor | None, stats) -> torch.Tensor:
    """Every rank's (B, C, H, W) latent valid where it `owned` (None: nowhere, the branch);
    returns the whole latent on every rank."""
    # torch.where, not a boolean index: indexing by a mask would sync a GPU (nonzero)
    mine = torch.zeros_like(latents) if owned is None else torch.where(owned, latents, latents.new_zeros(()))
    size = nbytes(mine)
    stats.record_op(size, size, kind="assemble")
    with stats.waiting(mine.device):
        wire.all_reduce(mine)
    return mine
