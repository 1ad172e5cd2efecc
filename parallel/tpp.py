"""Timestep-forcing pipeline parallelism (TPP): which denoising steps each rank owns.

With T steps per chunk and R ranks (R <= T), rank r owns a contiguous run of steps (run
lengths differ by at most one, earlier ranks take the extra). A chunk enters rank 0 as
noise, leaves rank r after its last step, and the last rank decodes it: every rank works
on a different chunk at the same time, so a stream's throughput is set by the slowest
rank, not by the sum of the steps. With R = T + 1 ranks the last rank only decodes (a
decode rank of its own); with R <= T it decodes after its own steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.config import ConfigError


@dataclass(frozen=True)
class StagePlan:
    steps: int
    ranks: int

    @classmethod
    def build(cls, steps: int, ranks: int) -> "StagePlan":
        if ranks < 1:
            raise ConfigError(f"tpp needs at least one rank, got {ranks}")
        if ranks > steps + 1:
            raise ConfigError(f"tpp: {ranks} ranks but only {steps} denoising steps per chunk; use at most "
                              f"{steps + 1} ranks (one per step, plus one that only decodes)")
        return cls(steps, ranks)

    @property
    def stage_ranks(self) -> int:
        """Ranks that own steps (all of them, or all but a decode-only last rank)."""
        return min(self.ranks, self.steps)

    def steps_of(self, rank: int) -> range:
        if rank >= self.stage_ranks:
            return range(0)
        base, extra = divmod(self.steps, self.stage_ranks)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))

    @property
    def decode_rank(self) -> int:
        return self.ranks - 1
