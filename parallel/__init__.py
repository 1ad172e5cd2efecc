"""Parallel strategies and the patch-aware layers they swap into a model.

Strategies: "none" (serial), "patch" (displaced patch parallelism, stale exchanges after
warm-up), "patch-sync" (same layers, fresh exchanges: exact). CFG split composes with
both. Layers talk to peers only through `comms`.
"""

from parallel.config import GN_MODES, STRATEGIES, ConfigError, ParallelConfig

__all__ = ["ParallelConfig", "ConfigError", "STRATEGIES", "GN_MODES"]
