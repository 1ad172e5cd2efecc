"""ASG traffic: the tile ranks' summed predictions and the branch rank's guidance.

- `sum_predictions`: every rank adds the predictions of its own tiles into a zero latent;
  one all-reduce gives every rank the sum over all tiles (the branch rank adds zeros).
  Counted as the payload once sent and once received per rank.
- `GuidanceChannel`: the branch rank broadcasts its guidance (prediction + mask, one flat
  tensor) asynchronously; the other ranks post the matching receive at the same point of
  the step and wait on it only when they apply the guidance (a step later with staleness 1).
  The time spent in that wait is the rank's guidance wait.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def sum_predictions(partial: torch.Tensor, stats) -> torch.Tensor:
    nbytes = partial.numel() * partial.element_size()
    stats.record_op(nbytes, nbytes, kind="tiles")
    with stats.waiting(partial.device):
        dist.all_reduce(partial)
    return partial


class GuidanceChannel:
    def __init__(self, src: int, stats):
        self.src = src
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.stats = stats

    def post(self, numel: int, dtype, device, guidance: torch.Tensor | None = None):
        """Start the broadcast of one step's guidance (the branch passes it, others None)."""
        if self.rank == self.src:
            buf = guidance.contiguous()
        else:
            buf = torch.empty(numel, dtype=dtype, device=device)
        nbytes = buf.numel() * buf.element_size()
        sent, received = (nbytes * (self.world - 1), 0) if self.rank == self.src else (0, nbytes)
        self.stats.record_op(sent, received, kind="guidance")
        return buf, dist.broadcast(buf, src=self.src, async_op=True)

    def wait(self, posted) -> tuple[torch.Tensor, float]:
        """(the guidance, seconds this rank waited for it)."""
        buf, work = posted
        start = time.perf_counter()
        with self.stats.waiting(buf.device):
            work.wait()
        return buf, time.perf_counter() - start
