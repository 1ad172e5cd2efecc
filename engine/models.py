"""Model loading: built-in presets, local diffusers directories, hub ids where reachable."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.presets import PRESETS
from parallel.config import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    """What request validation needs to know about a loaded model (picklable)."""

    name: str
    pipeline: str
    vae_scale_factor: int
    align: int  # latent rows per smallest patch band (denoiser downsampling factor)
    native_size: int  # default height/width in pixels

    @property
    def pixel_align(self) -> int:
        return self.vae_scale_factor * self.align


def check_model_spec(model: str) -> None:
    """Fail early, before any rank starts, on a model that cannot possibly load."""
    if not isinstance(model, str) or not model:
        raise ConfigError("model must be a preset name, a local diffusers directory or a hub id")
    if model in PRESETS:
        return
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ConfigError(f"{model} is a directory but not a diffusers pipeline (no model_index.json)")
        return
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/"))
    if not looks_like_hub_id:
        raise ConfigError(
            f"unknown model {model!r}: not a preset ({', '.join(sorted(PRESETS))}), "
            "not a local diffusers directory, not a hub id"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConfigError(f"model {model!r} looks like a hub id but HF_HUB_OFFLINE is set; use a preset or a local directory")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype | None = None):
    """A diffusers pipeline on `device`, float32 on CPU and half precision on CUDA by default."""
    check_model_spec(model)
    dtype = dtype or default_dtype(device)
    if model in PRESETS:
        pipe = PRESETS[model]()  # float32, as built
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    return pipe.to(device)


def save_preset(name: str, path: str) -> str:
    """Write a preset as an ordinary diffusers directory (loadable with from_pretrained)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    PRESETS[name]().save_pretrained(path)
    return path


def resolve_scheduler(name: str):
    """A diffusers scheduler class from its name (e.g. 'EulerDiscreteScheduler')."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"unknown scheduler {name!r}: expected a diffusers scheduler class name such as DDIMScheduler")
    return cls
