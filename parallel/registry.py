"""Strategies by name: the one place a strategy's name is compared.

Everything else asks the strategy what it does (`strategy_of(config).splits_rows`, ...):
adding a strategy means adding one entry here and the code its `runner` names.

- `runner` names what drives the denoiser for a request: "serial" (the unmodified
  pipeline on every rank), "bands" (the pipeline with the patch layers active: row bands
  of one latent), "tiles" (`asg`: native-size tiles with structure guidance) or "chunks"
  (`tpp`: a video stream pipelined over the ranks).
- `stale`: after `warmup_steps` synchronous steps, exchanges read the previous step's
  tensors (displaced patch parallelism); otherwise every exchange is fresh.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.errors import ConfigError


@dataclass(frozen=True)
class Strategy:
    name: str
    runner: str  # "serial", "bands", "tiles" or "chunks"
    summary: str
    stale: bool = False
    adjacent_kv: bool = False  # self-attention sees only boundary rows of adjacent bands, after warm-up
    compiles: bool = False  # ParallelConfig.compile applies
    multi_rank: bool = True

    @property
    def splits_rows(self) -> bool:
        """Row bands of one latent over the ranks, with the patch layers active."""
        return self.runner == "bands"

    @property
    def streams_video(self) -> bool:
        """Serves `Engine.stream` of a causal video model (one rank when serial)."""
        return self.runner in ("serial", "chunks")

    @property
    def serves_images(self) -> bool:
        return self.runner != "chunks"

    @property
    def splits_cfg(self) -> bool:
        """May put the two halves of a guided batch on two rank groups."""
        return self.runner in ("serial", "bands")

    def sync_at(self, step: int, warmup_steps: int) -> bool:
        """Whether step `step`'s exchanges are fresh and blocking."""
        return not self.stale or step < warmup_steps

    def steady_from(self, warmup_steps: int, compiled: bool = False) -> int:
        """The first step of the steady state. Stale strategies: after the first stale step
        (it records the buckets) and, compiled, after the first bucketed step too (it still
        reads the recorded posts); else after the first step."""
        return warmup_steps + 1 + int(compiled) if self.stale else 1


_ALL = (
    Strategy("none", "serial", "serial diffusers on one rank", compiles=True, multi_rank=False),
    Strategy("patch", "bands", "displaced patch parallelism: stale neighbour activations after warm-up",
             stale=True, compiles=True),
    Strategy("patch-sync", "bands", "the patch layers with every exchange fresh: equal to serial", compiles=True),
    Strategy("pcpp", "bands", "partially conditioned patch parallelism: as patch, self-attention sees "
             "boundary rows of adjacent bands only", stale=True, adjacent_kv=True, compiles=True),
    Strategy("asg", "tiles", "beyond-native resolution: native-size tiles with asynchronous structure guidance"),
    Strategy("tpp", "chunks", "video streaming: rank k owns denoising step k of every chunk"),
)
REGISTRY = {s.name: s for s in _ALL}
STRATEGIES = tuple(REGISTRY)
PATCH_STRATEGIES = tuple(s.name for s in _ALL if s.splits_rows)  # those that split the latent into row bands


def strategy_of(what) -> Strategy:
    """The Strategy of a name or of anything with a `.strategy` name (ParallelConfig)."""
    name = getattr(what, "strategy", what)
    strategy = REGISTRY.get(name) if isinstance(name, str) else None
    if strategy is None:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


def default_strategy(world_size: int, video: bool) -> str:
    """What a request without a strategy runs: serial on one rank, else the model kind's own."""
    if world_size <= 1:
        return "none"
    return "tpp" if video else "patch"


def video_strategies(several_ranks_only: bool = False) -> str:
    """For messages: "'tpp' (or 'none' on one rank)"."""
    several = " or ".join(repr(s.name) for s in _ALL if s.streams_video and s.multi_rank)
    one = " or ".join(repr(s.name) for s in _ALL if s.streams_video and not s.multi_rank)
    return several if several_ranks_only else f"{several} (or {one} on one rank)"


def names(predicate) -> list[str]:
    """Names of the strategies for which `predicate(strategy)` holds (for messages, choices)."""
    return [s.name for s in _ALL if predicate(s)]
