"""Models: what the engine can load and what it knows about each before loading it.

- `loading`: resolve a model name (preset, trained preset, local directory, hub id),
  describe it without loading weights, load or save it, pick a scheduler.
- `info`: ModelInfo, the facts validation needs (sizes, alignment, CFG batching).
- `presets`, `presets_dit`, `presets_layout`: tiny random-weight pipelines for tests and the
  layout presets with real architectures' layer graphs; `weights/`: the trained shapes-sd,
  with its trainer `train_shapes`.
- `video`, `causal_video`: the causal video model streamed by `tpp` and its Wan-style
  transformer with a rolling KV cache.
"""

from engine.models.info import ModelInfo
from engine.models.loading import (
    check_model_spec,
    default_dtype,
    denoiser_of,
    describe_model,
    info_from_pipeline,
    load_pipeline,
    pipeline_call_kwargs,
    preset_names,
    resolve_scheduler,
    save_preset,
)

__all__ = ["ModelInfo", "check_model_spec", "default_dtype", "denoiser_of", "describe_model", "info_from_pipeline",
           "load_pipeline", "pipeline_call_kwargs", "preset_names", "resolve_scheduler", "save_preset"]
