"""What a user calls: Engine, ParallelConfig, results; model loading and presets."""

from engine.api import Engine
from engine.results import GenerateResult, VideoStream
from parallel.config import ConfigError, ParallelConfig

__all__ = ["Engine", "GenerateResult", "VideoStream", "ParallelConfig", "ConfigError"]
