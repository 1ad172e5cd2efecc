"""Model loading: built-in presets, local diffusers directories, hub ids where reachable."""

from __future__ import annotations

import os

import torch

from engine.models.info import ModelInfo
from engine.models.presets import PRESET_INFO, PRESETS, TRAINED_PRESETS
from engine.models.single_file import SingleFile, load_single_file, safetensors_header
from parallel.config import ConfigError


def preset_names() -> list[str]:
    from engine.models.video import VIDEO_PRESETS

    return sorted(PRESETS) + sorted(TRAINED_PRESETS) + sorted(VIDEO_PRESETS)


def _check_json(path: str):
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None


def check_pipeline_dir(path: str) -> None:
    """A diffusers directory as far as the caller can tell without loading it: the index,
    every component it lists (its JSON files parse, its safetensors headers are sound)."""
    index_path = os.path.join(path, "model_index.json")
    index = _check_json(index_path)
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ConfigError(f"{index_path}: no _class_name, so not a diffusers pipeline index")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue  # a setting, or an optional component left out
        component = os.path.join(path, name)
        if not os.path.isdir(component):
            raise ConfigError(f"{component}: missing, but {index_path} lists component {name!r}")
        for entry in sorted(os.listdir(component)):
            file = os.path.join(component, entry)
            if entry.endswith(".json"):
                _check_json(file)
            elif entry.endswith(".safetensors"):
                safetensors_header(file)  # an 8-byte length, then that much JSON


def _trained_dir(name: str) -> str:
    path = TRAINED_PRESETS[name]
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ConfigError(f"preset {name!r}: its weights are missing from {path} (train them with engine/models/train_shapes.py)")
    return path


def check_model_spec(model):
    """Fail early, before any rank starts, on a model that cannot possibly load. Returns the
    spec the ranks load (a single-file checkpoint with the config it will use)."""
    from engine.models.single_file import check_single_file, model_spec

    model = model_spec(model)
    if isinstance(model, SingleFile):
        return check_single_file(model)
    if not isinstance(model, str) or not model:
        raise ConfigError("model must be a preset name, a local diffusers directory, a single-file checkpoint "
                          "or a hub id")
    if model in PRESETS:
        return model
    from engine.models.video import is_video_model

    if is_video_model(model):
        return model
    if model in TRAINED_PRESETS:
        _trained_dir(model)
        return model
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ConfigError(f"{model} is a directory but not a diffusers pipeline (no model_index.json)")
        check_pipeline_dir(model)
        return model
    check_hub_id(model, "model", f"not a preset ({', '.join(preset_names())}), not a local diffusers directory")
    return model


def check_hub_id(spec: str, what: str, not_else: str) -> None:
    """Refuse `spec` (no preset, no local path) unless it looks like a hub id and the hub may be
    used: `not_else` says what else it is not."""
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise ConfigError(f"unknown {what} {spec!r}: {not_else}, not a hub id")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConfigError(f"{what} {spec!r} looks like a hub id but HF_HUB_OFFLINE is set; use a preset or a local "
                          "directory")


# DiT denoisers: latent rows per row of tokens. Flux packs 2x2 latents into one token.
_TOKEN_ROWS = {
    "PixArtTransformer2DModel": lambda c: c["patch_size"],
    "SD3Transformer2DModel": lambda c: c["patch_size"],
    "FluxTransformer2DModel": lambda c: 2 * c["patch_size"],
}
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's fixed default, whatever the transformer


def _info_from_configs(name: str, pipeline: str, denoiser: str, config: dict, vae: dict) -> ModelInfo:
    """ModelInfo from the denoiser's class name and config and the VAE config (dicts or
    diffusers FrozenDicts)."""
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if denoiser in _TOKEN_ROWS:
        align = _TOKEN_ROWS[denoiser](config)
        sample = config.get("sample_size", FLUX_DEFAULT_SAMPLE_SIZE)
        # Flux never batches uncond + cond: guidance is embedded (or two separate true-CFG calls).
        does_cfg = denoiser != "FluxTransformer2DModel"
    else:
        # UNet2DConditionModel downsamples at the end of every down block but the last.
        align = 2 ** (len(config["down_block_types"]) - 1)
        sample = config["sample_size"]
        does_cfg = config.get("time_cond_proj_dim") is None
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return ModelInfo(name, pipeline, vae_factor, align, sample * vae_factor, does_cfg, vae.get("latent_channels", 4))


def denoiser_of(pipe):
    """The pipeline's denoising network: its UNet or its transformer."""
    for attr in ("unet", "transformer"):
        denoiser = getattr(pipe, attr, None)
        if denoiser is not None:
            return denoiser
    raise ConfigError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def pipeline_call_kwargs(pipe) -> dict:
    """Arguments every call of this pipeline needs so that it generates exactly the requested
    size and stays quiet: PixArt-style pipelines snap height/width to an aspect-ratio bin
    (64x64 becomes 256x256 at sample_size 32) and default to clean_caption=True, which needs
    bs4 and ftfy and otherwise logs a warning on every call."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    return {key: False for key in ("use_resolution_binning", "clean_caption") if key in params}


def info_from_pipeline(name: str, pipe) -> ModelInfo:
    """ModelInfo of a loaded pipeline, by the same rules as describe_model."""
    denoiser = denoiser_of(pipe)
    pipeline, kind = type(pipe).__name__, type(denoiser).__name__
    return _info_from_configs(name, pipeline, kind, denoiser.config, pipe.vae.config)


def describe_model(model) -> ModelInfo | None:
    """ModelInfo from configs alone (no weights), so requests can be validated before any
    rank is started. None when only loading can tell (a hub id)."""
    import json

    model = check_model_spec(model)
    if isinstance(model, SingleFile):  # described by its config directory
        path = model.config
    elif model in PRESETS:
        return PRESET_INFO[model]
    else:
        path = _trained_dir(model) if model in TRAINED_PRESETS else model
    if os.path.isdir(path):
        def read(*parts):
            with open(os.path.join(path, *parts)) as f:
                return json.load(f)

        try:
            index, vae = read("model_index.json"), read("vae", "config.json")
            config = read("unet" if "unet" in index else "transformer", "config.json")
            pipeline, denoiser = index.get("_class_name", "?"), config.get("_class_name", "?")
            return _info_from_configs(str(model), pipeline, denoiser, config, vae)
        except (OSError, KeyError, ValueError):  # a layout or denoiser this does not know
            return None
    return None


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_pipeline(model, device: torch.device, dtype: torch.dtype | None = None):
    """A diffusers pipeline on `device`, float32 on CPU and half precision on CUDA by default."""
    model = check_model_spec(model)
    dtype = dtype or default_dtype(device)
    if isinstance(model, SingleFile):
        pipe = load_single_file(model, dtype)
    elif model in PRESETS:
        pipe = PRESETS[model]()  # float32, as built
    else:
        from diffusers import DiffusionPipeline

        path = _trained_dir(model) if model in TRAINED_PRESETS else model
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    if denoiser_of(pipe).dtype != dtype:
        pipe.to(dtype=dtype)
    return inference_mode(pipe).to(device)


def inference_mode(pipe):
    """Every model of `pipe` in eval mode: presets are built rather than loaded, and peft adds
    its LoRA layers in training mode, where a LoRA's dropout would act (differently per rank)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def save_preset(name: str, path: str) -> str:
    """Write a preset as an ordinary diffusers directory (loadable with from_pretrained);
    a video preset as the directory layout of engine.models.video."""
    from engine.models.video import VIDEO_PRESETS, load_video_model, save_video_model

    if name in VIDEO_PRESETS:
        return save_video_model(load_video_model(name), path)
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS) + list(VIDEO_PRESETS))}")
    PRESETS[name]().save_pretrained(path)
    return path


# Pipelines whose models predict a flow (they sample with FlowMatch* schedulers only).
FLOW_MATCH_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
# Samplers outside diffusers' KarrasDiffusionSchedulers list that text-to-image pipelines take.
_OTHER_SAMPLERS = ("LCMScheduler", "TCDScheduler")


def resolve_scheduler(name: str, pipeline: str | None = None):
    """A diffusers sampler class from its name (e.g. 'EulerDiscreteScheduler'), checked to fit
    `pipeline` (a pipeline class name) when given: flow-matching models take FlowMatch*
    schedulers, the others noise-prediction samplers."""
    import diffusers
    from diffusers import SchedulerMixin
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    if not isinstance(name, str) or not name:
        raise ConfigError(f"scheduler must be a diffusers scheduler class name, got {name!r}")
    cls = getattr(diffusers, name, None)
    if isinstance(cls, type) and type(cls).__name__ == "DummyObject":  # an optional dependency is missing
        needs = [b for b in getattr(cls, "_backends", []) if b != "torch"]
        raise ConfigError(f"{name} needs {' and '.join(needs)}, which is not installed (pip install {' '.join(needs)})")
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"unknown scheduler {name!r}: expected a diffusers scheduler class name such as DDIMScheduler")
    flow = name.startswith("FlowMatch")
    samplers = [s.name for s in KarrasDiffusionSchedulers] + list(_OTHER_SAMPLERS)
    if not flow and name not in samplers:
        raise ConfigError(f"{name} is not a sampler the text-to-image pipelines take; choose e.g. "
                          "EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler or FlowMatchEulerDiscreteScheduler")
    if pipeline is not None and flow != (pipeline in FLOW_MATCH_PIPELINES):
        kind = "flow-matching" if pipeline in FLOW_MATCH_PIPELINES else "noise-prediction"
        raise ConfigError(f"{name} does not fit {pipeline}, a {kind} model: "
                          + ("use a FlowMatch* scheduler" if kind == "flow-matching" else "use a noise-prediction sampler "
                             "such as EulerDiscreteScheduler"))
    return cls
