"""ASG traffic: overlap strips between tile ranks, view pixels to the branch rank, the
branch's guidance back, and the final latent.

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

from comms.stats import nbytes
from parallel.asg_tiles import TilePlan

STRIP_TAG = 7101
VIEW_TAG = 7102


class StripExchange:
    def __init__(self, plan: TilePlan, stats, group=None):
        self.plan, self.stats, self.group = plan, stats, group
        me = plan.index
        self.peers = [s for s in range(plan.tile_ranks) if s != me]
        # flat position indices, moved to the latent's device on first use: a boolean mask
        # would sync a GPU on every gather, a CPU index would be copied on every step
        positions = lambda mask: mask.flatten().nonzero().squeeze(1)  # noqa: E731
        self.view = plan.view
        self.shared = {s: positions(plan.shared(s)) for s in self.peers}
        self.view_mine = plan.view[plan.view_covered(me)]
        self.view_theirs = {s: positions(plan.view_covered(s)) for s in self.peers}
        self.device = torch.device("cpu")

    def _to(self, device: torch.device) -> None:
        if device != self.device:
            self.view, self.view_mine = self.view.to(device), self.view_mine.to(device)
            self.shared = {s: i.to(device) for s, i in self.shared.items()}
            self.view_theirs = {s: i.to(device) for s, i in self.view_theirs.items()}
            self.device = device

    def complete(self, partial: torch.Tensor, with_view: bool):
        """(the averaged-region sum, the full sum on the view pixels (B, C, n) or None)."""
        self._to(partial.device)
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
            ops += [dist.P2POp(dist.isend, message, s, self.group, STRIP_TAG),
                    dist.P2POp(dist.irecv, buf, s, self.group, STRIP_TAG)]
            sent += nbytes(message)
            received += nbytes(buf)
            recvs[s] = (buf, strip)
        if not ops:
            return partial, down
        self.stats.record_op(sent, received, ops=len(ops), kind="tiles")
        with self.stats.waiting(partial.device):
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for s, (buf, strip) in recvs.items():
            flat[..., self.shared[s]] += buf[..., :strip]
            if with_view:
                down[..., self.view_theirs[s]] += buf[..., strip:]
        return partial, down


class BranchChannel:
    def __init__(self, branch: int, stats, group=None):
        self.branch = branch
        self.rank = dist.get_rank()
        self.stats, self.group = stats, group
        self.world = dist.get_world_size(group)
        self.inflight: list = []  # sends and broadcasts to finish before the request ends
        self._positions: dict = {}  # (rank, device) -> flat latent positions of its owned view pixels

    def _owned_positions(self, plan: TilePlan, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent positions, places in the view) of the view pixels tile rank `rank` owns, on
        `device`, computed once (indexing with CPU tensors would copy them every step)."""
        key = (rank, device)
        if key not in self._positions:
            owned = plan.view_owned(rank)
            self._positions[key] = (plan.view[owned].to(device), owned.nonzero().squeeze(1).to(device))
        return self._positions[key]

    def send_view(self, sample: torch.Tensor, plan: TilePlan) -> None:
        """Tile rank: start sending its own view pixels of `sample` to the branch rank."""
        positions, _ = self._owned_positions(plan, plan.index, sample.device)
        if positions.numel() == 0:
            return
        values = sample.flatten(-2)[..., positions].contiguous()
        self.stats.record_op(nbytes(values), 0, kind="view")
        self.inflight.append((values, dist.isend(values, self.branch, self.group, VIEW_TAG)))

    def gather_view(self, sample: torch.Tensor, plan: TilePlan, native: tuple[int, int]) -> torch.Tensor:
        """Branch rank: receive every tile rank's view pixels; (B, C, h, w)."""
        view = sample.new_zeros(*sample.shape[:-2], plan.view.numel())
        pending = []
        for r in range(plan.tile_ranks):
            _, owned = self._owned_positions(plan, r, sample.device)
            if owned.numel() == 0:
                continue
            buf = sample.new_empty(*sample.shape[:-2], owned.numel())
            self.stats.record_op(0, nbytes(buf), kind="view")
            pending.append((owned, buf, dist.irecv(buf, r, self.group, VIEW_TAG)))
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
        posted = (buf, dist.broadcast(buf, src=self.branch, group=self.group, async_op=True))
        if self.rank == self.branch:
            self.inflight.append(posted)
        return posted

    def wait(self, posted) -> tuple[torch.Tensor, float]:
        """(the guidance, seconds this rank waited for it)."""
        buf, work = posted
        start = time.perf_counter()
        with self.stats.waiting():  # host clock: on CUDA, syncing the stream makes it the real stall
            work.wait()
            if buf.device.type == "cuda":
                torch.cuda.current_stream(buf.device).synchronize()
        return buf, time.perf_counter() - start

    def finish(self) -> None:
        for _, work in self.inflight:
            work.wait()
        self.inflight.clear()


def assemble_latents(latents: torch.Tensor, owned: torch.Tensor | None, stats) -> torch.Tensor:
    """Every rank's (B, C, H, W) latent valid where it `owned` (None: nowhere, the branch);
    returns the whole latent on every rank."""
    mine = torch.zeros_like(latents)
    if owned is not None:
        mine[..., owned] = latents[..., owned]
    size = nbytes(mine)
    stats.record_op(size, size, kind="assemble")
    with stats.waiting(mine.device):
        dist.all_reduce(mine)
    return mine
