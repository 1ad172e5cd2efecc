"""Timestep-forcing pipeline parallelism (TPP): which denoising steps each rank owns.

With T steps per chunk and R ranks (R <= T), rank r owns a contiguous run of steps (run
lengths differ by at most one, earlier ranks take the extra). A chunk enters rank 0 as
noise, leaves rank r after its last step, and the last rank decodes it: every rank works
on a different chunk at the same time, so a stream's throughput is set by the slowest
rank, not by the sum of the steps. With R = T + 1 ranks the last rank only decodes (a
decode rank of its own); with R <= T it decodes after its own steps.

`StagePlan` says which steps a rank owns; `run_chunk_pipeline` is the loop every rank runs,
with the model's parts (noise, its steps, decode) passed in as a `ChunkStage`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

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


@dataclass
class PipelineCounters:
    """What the chunk loop measured on this rank, readable after it ends (also on error)."""

    chunks: int = 0  # chunks this rank finished
    decode_s: float = 0.0
    throttled_s: float = 0.0  # rank 0 held back by a consumer that is behind


@dataclass
class ChunkStage:
    """One rank's work on a chunk, supplied by the runtime: the model-specific parts."""

    noise: Callable[[], torch.Tensor]  # rank 0: a new chunk's starting latent
    denoise: Callable[[torch.Tensor, int], torch.Tensor]  # this rank's steps on (latent, chunk)
    decode: Callable[[torch.Tensor], object]  # the last rank: clean latent -> frames
    before_chunk: Callable[[int], None] = lambda chunk: None


def run_chunk_pipeline(plan: StagePlan, rank: int, link, stage: ChunkStage, num_chunks: int | None,
                       counters: PipelineCounters, should_stop=lambda: False, may_start=lambda chunk: None):
    """The pipeline loop of one rank: rank 0 draws each chunk's noise, every rank runs its
    steps on what the previous rank sent and sends the result on (`link`, a
    `comms.chunk_link.ChunkLink`; None with one rank), the decode rank yields
    (chunk, frames). `should_stop()` is asked by rank 0 before each chunk; `may_start(chunk)`
    may hold rank 0 back (backpressure). A STOP word travels down the pipeline at the end."""
    from comms.chunk_link import STOP

    first, last = rank == 0, rank == plan.decode_rank
    chunk = 0
    while True:
        stage.before_chunk(chunk)
        if first:
            if (num_chunks is not None and chunk >= num_chunks) or should_stop():
                break
            held_from = time.perf_counter()
            may_start(chunk)
            counters.throttled_s += time.perf_counter() - held_from
            if should_stop():  # stopped while held back: start nothing more
                break
            latent = stage.noise()
        else:
            got, latent = link.recv()
            if got == STOP:
                break
            if got != chunk:
                raise RuntimeError(f"rank {rank} expected chunk {chunk}, received {got}")
        latent = stage.denoise(latent, chunk)
        if last:
            began = time.perf_counter()
            frames = stage.decode(latent)
            counters.decode_s += time.perf_counter() - began
            try:
                yield chunk, frames
            except GeneratorExit:
                # The caller stopped early. With a launcher, rank 0 is told by its stop event;
                # under torchrun it runs to num_chunks, so drain (without computing) what
                # upstream ranks still send, and nobody waits on this rank forever.
                while link is not None and link.recv()[0] != STOP:
                    pass
                raise
        else:
            link.send(chunk, latent)
        chunk += 1
        counters.chunks = chunk
    if not last:
        link.send(STOP, None)
        link.close()
