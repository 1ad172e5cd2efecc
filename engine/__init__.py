"""What a user calls: Engine, ParallelConfig, results; model loading and presets."""

from engine.engine import Engine, GenerateResult
from parallel.config import ConfigError, ParallelConfig

__all__ = ["Engine", "GenerateResult", "ParallelConfig", "ConfigError"]
