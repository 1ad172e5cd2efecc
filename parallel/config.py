"""ParallelConfig: how one generation is split across ranks (user-facing, validated early)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def is_int(value) -> bool:
    """An integer and not a bool (True is an int to Python, never to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float and not a bool (NaN included: range checks refuse it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


from parallel.errors import ConfigError
from parallel.registry import PATCH_STRATEGIES, STRATEGIES, names, strategy_of

__all__ = ["ParallelConfig", "ConfigError", "STRATEGIES", "PATCH_STRATEGIES", "GN_MODES", "is_int", "is_number"]

# Beyond 1 the guidance extrapolates past the branch on its grid; far beyond it overshoots.
MAX_ASG_STRENGTH = 4.0
# Below a second the store and the communicators cannot even connect; a timeout that small
# only turns a slow step into a failure.
MIN_TIMEOUT_S = 1.0
GN_MODES = ("corrected", "extrapolated", "sync")


@dataclass(frozen=True)
class ParallelConfig:
    """
    strategy:      "none" (serial diffusers), "patch" (displaced patch parallelism with
                   stale neighbour activations) or "patch-sync" (same layers, every
                   exchange fresh: equal to serial up to float reassociation) or "pcpp"
                   (partially conditioned patch parallelism: after warm-up, self-attention
                   sees its own band plus only the adjacent `pcpp_portion` of each
                   neighbouring band, stale; convs and GroupNorm as in "patch").
    world_size:    number of ranks; None takes it from torchrun's environment, else 1.
    warmup_steps:  synchronous denoiser evaluations before staleness starts ("patch", "pcpp").
    pcpp_portion:  share (0, 1] of each adjacent band's rows that "pcpp" attends to: the
                   last rows of the band above and the first rows of the band below.
    asg_tile_overlap, asg_strength, asg_mask_floor, asg_detail_steps, asg_staleness:
                   strategy "asg" (high resolution with structure guidance, see
                   parallel/asg/): the overlap of native-size tiles in latent rows (None: a
                   quarter of a tile), the guidance weight at the noisiest step (0 to 4;
                   above 1 it extrapolates past the branch on its grid), the structure
                   mask's floor (0: the normalised attention map as is, 1: no mask), the
                   last steps run without guidance (None: a quarter of the steps), and
                   how many steps old the guidance a tile uses may be in a parallel run
                   (0 or 1). Defaults measured on shapes-sd at 2x (README).
                   "tpp" streams video from a causal video model (engine.runtime.video): rank r
                   owns a run of the denoising steps of every chunk (engine/runtime/video.py).
    gn_mode:       "corrected" (DistriFusion: stale global GroupNorm statistics plus this
                   band's own change), "extrapolated" (the same on statistics predicted
                   from the last two steps; same bytes, closer to serial on trained
                   models) or "sync" (exact all-gather of statistics every step).
    cfg_split:     put the unconditional and conditional halves of a guided batch on two
                   rank groups; None = on whenever guidance is used and world_size is even.
    bucket_mb:     stale posts per step are sent in a few bucketed operations on static
                   buffers: None cuts each step into three phases of about equal bytes,
                   a positive number into phases of about that many MB, 0 sends every
                   layer's post as its own operation (slower; for comparison).
    compile:       torch.compile the denoiser with the parallel layers (inductor): the
                   repeating steps run compiled, the warm-up and the first stale step
                   eagerly (parallel/patch/compiled.py). Strategies none, patch, patch-sync, pcpp.
    comm_timeout_s: bound on any collective; a vanished peer becomes an error, not a hang.
    trace_comms:   record every post and wait of stale exchanges in the report.
    threads_per_rank: CPU threads per spawned rank (None: cores / local ranks).
    """

    strategy: str = "patch"
    world_size: int | None = None
    warmup_steps: int = 4
    pcpp_portion: float = 0.3
    asg_tile_overlap: int | None = None
    asg_strength: float = 2.0
    asg_mask_floor: float = 0.5
    asg_detail_steps: int | None = None
    asg_staleness: int = 1
    gn_mode: str = "corrected"
    cfg_split: bool | None = None
    bucket_mb: float | None = None
    compile: bool = False
    comm_timeout_s: float = 120.0
    trace_comms: bool = False
    threads_per_rank: int | None = None

    def validate(self) -> "ParallelConfig":
        strategy = strategy_of(self.strategy)
        if self.world_size is not None and (not is_int(self.world_size) or self.world_size < 1):
            raise ConfigError(f"world_size must be a positive integer, got {self.world_size!r}")
        if not strategy.multi_rank and (self.world_size or 1) > 1:
            raise ConfigError(
                f"strategy {self.strategy!r} runs on one rank, but world_size is {self.world_size}; "
                f"use {', '.join(repr(n) for n in PATCH_STRATEGIES)} for several ranks"
            )
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        portion = self.pcpp_portion
        if not is_number(portion) or not 0.0 < portion <= 1.0:
            raise ConfigError(f"pcpp_portion must be a number in (0, 1], got {portion!r}")
        if self.asg_tile_overlap is not None and (not is_int(self.asg_tile_overlap) or self.asg_tile_overlap < 0):
            raise ConfigError(f"asg_tile_overlap must be a non-negative integer (latent rows), got {self.asg_tile_overlap!r}")
        for name, value, high in (("asg_strength", self.asg_strength, MAX_ASG_STRENGTH),
                                  ("asg_mask_floor", self.asg_mask_floor, 1.0)):
            if not is_number(value) or not 0.0 <= value <= high:
                raise ConfigError(f"{name} must be a number in [0, {high:g}], got {value!r}")
        detail = self.asg_detail_steps
        if detail is not None and (not is_int(detail) or detail < 0):
            raise ConfigError(f"asg_detail_steps must be a non-negative integer, got {detail!r}")
        if not is_int(self.asg_staleness) or self.asg_staleness not in (0, 1):
            raise ConfigError(f"asg_staleness must be 0 or 1, got {self.asg_staleness!r}")
        if self.gn_mode not in GN_MODES:
            raise ConfigError(f"unknown gn_mode {self.gn_mode!r}; choose one of {', '.join(GN_MODES)}")
        if self.cfg_split is not None and not isinstance(self.cfg_split, bool):
            raise ConfigError(f"cfg_split must be True, False or None (auto), got {self.cfg_split!r}")
        mb = self.bucket_mb
        if mb is not None and (not is_number(mb) or not 0 <= mb < math.inf):
            raise ConfigError(f"bucket_mb must be None, 0 or a positive number of MB, got {mb!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")
        if self.compile and not strategy.compiles:
            raise ConfigError(f"compile supports the strategies {', '.join(names(lambda s: s.compiles))}; "
                              f"not {self.strategy!r}")
        timeout = self.comm_timeout_s
        if not is_number(timeout) or not MIN_TIMEOUT_S <= timeout < math.inf:
            raise ConfigError(f"comm_timeout_s must be a finite number of seconds >= {MIN_TIMEOUT_S:g}, got {timeout!r}")
        if not isinstance(self.trace_comms, bool):
            raise ConfigError(f"trace_comms must be True or False, got {self.trace_comms!r}")
        threads = self.threads_per_rank
        if threads is not None and (not is_int(threads) or threads < 1):
            raise ConfigError(f"threads_per_rank must be None or a positive integer, got {threads!r}")
        return self
