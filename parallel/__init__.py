"""Parallel strategies: what each one is (`registry`, the only place a strategy's name is
compared), how a request is configured (`config`), and the methods themselves:

- `patch/`: patch, patch-sync and pcpp: the latent in row bands, patch-aware layers
  swapped into the model (halo convs, GroupNorm, self-attention), stale exchanges;
- `asg/`: beyond-native resolution with asynchronous structure guidance (tiles + branch);
- `tpp`: the stage plan of timestep-forcing pipeline parallelism for video streams (its
  chunk loop is `engine.runtime.video`).

Layers talk to peers only through `comms`, which knows nothing of diffusion.
"""

from parallel.config import GN_MODES, STRATEGIES, ConfigError, ParallelConfig

__all__ = ["ParallelConfig", "ConfigError", "STRATEGIES", "GN_MODES"]
