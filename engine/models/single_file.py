"""Single-file checkpoints: one `.safetensors` (or `.ckpt`) holding a whole SD 1.x or SDXL
model in the original (LDM) layout, as most community fine-tunes are shared.

diffusers' `from_single_file` converts such a file with the component configs of a diffusers
directory of the same architecture (`config`); without one it fetches the configs from the
hub, which an offline machine cannot. A `SingleFile` is the model spec the ranks receive:
each rank loads the file itself, so on several machines it must exist at the same path on
each. Caller side, `check_single_file` refuses what cannot load before any rank starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from parallel.errors import ConfigError

SUFFIXES = (".safetensors", ".ckpt")
# Pipelines whose single-file loading is tested here (tests/test_single_file.py).
SINGLE_FILE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
UNET_PREFIX = "model.diffusion_model."  # every SD 1.x / SDXL checkpoint's denoiser
# The text encoders' prefixes tell the families apart (the UNets' keys look alike).
FAMILY_PREFIXES = {"StableDiffusionPipeline": "cond_stage_model.", "StableDiffusionXLPipeline": "conditioner.embedders."}
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header beyond this is a corrupt length


@dataclass(frozen=True)
class SingleFile:
    """A single-file checkpoint and the diffusers directory (or hub id) of its configs."""

    path: str
    config: str | None = None

    def __str__(self) -> str:  # reports and messages name the file
        return self.path


def is_single_file(model) -> bool:
    return isinstance(model, SingleFile)


def model_spec(model, config: str | None = None):
    """What the ranks load: `model` itself, or a SingleFile when `model` is a checkpoint file."""
    if isinstance(model, SingleFile):
        if config is not None:
            raise ConfigError("give config either in SingleFile(...) or as config=, not both")
        return model
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).lower().endswith(SUFFIXES):
        return SingleFile(os.fspath(model), None if config is None else os.fspath(config))
    if config is not None:
        raise ConfigError(f"config= names the configs of a single-file checkpoint ({' or '.join(SUFFIXES)}); "
                          f"{model!r} is not one")
    return model


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes), read without the weights."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(MAX_HEADER_BYTES, os.path.getsize(path) - 8):
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a safetensors file ({exc})") from None
    return header


def pipeline_class_of(config: str) -> str:
    """The pipeline class a diffusers directory (or hub id) names in its model_index.json."""
    if os.path.isdir(config):
        index_path = os.path.join(config, "model_index.json")
        try:
            with open(index_path) as f:
                return json.load(f)["_class_name"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"config {config}: no readable model_index.json with a _class_name ({exc})") from None
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(config)["_class_name"]  # a hub id: downloads the index


def checkpoint_shapes(path: str) -> dict[str, list[int]] | None:
    """Tensor name -> shape of a checkpoint, read without its weights (a safetensors header,
    or a zip-format .ckpt memory-mapped); None for a legacy .ckpt only loading can read."""
    if path.lower().endswith(".safetensors"):
        return {k: v["shape"] for k, v in safetensors_header(path).items() if k != "__metadata__"}
    import torch

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:1] == b"\x80":  # a pickle: torch's pre-zip format, which cannot be memory-mapped
        return None  # the ranks' loading will tell
    if magic != b"PK\x03\x04":
        raise ConfigError(f"{path}: not a readable checkpoint (neither safetensors nor a torch file)")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # unpickling refused (weights_only) or a damaged file
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # how the original training code saved them
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a checkpoint of named tensors")
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _hub_config_for(shapes: dict) -> str | None:
    """The hub repo whose configs diffusers would fetch for this checkpoint (None: unknown)."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    # diffusers infers the model type from key names and a few shapes: meta tensors suffice
    meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    try:
        return DIFFUSERS_DEFAULT_PIPELINE_PATHS[infer_diffusers_model_type(meta)]["pretrained_model_name_or_path"]
    except Exception:  # a heuristic over key names and shapes: a checkpoint it does not expect may break it
        return None


def check_single_file(spec: SingleFile) -> SingleFile:
    """Refuse, before any rank starts, a checkpoint or config that cannot load; returns the spec
    with the hub config diffusers would use filled in when none was given and the hub is usable."""
    from engine.models.loading import check_hub_id, check_pipeline_dir

    path = spec.path
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such checkpoint file")
    shapes = checkpoint_shapes(path)
    if shapes is not None and not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise ConfigError(f"{path}: no {UNET_PREFIX}* weights, so not an SD 1.x / SDXL single-file checkpoint "
                          "(a LoRA? load it with engine.load_lora)")
    config = spec.config
    if config is None:
        guess = _hub_config_for(shapes) if shapes is not None else None
        where = f"diffusers would fetch {guess} from the hub" if guess else "its architecture is not recognised"
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or guess is None:
            raise ConfigError(f"{path}: a single-file checkpoint needs config= (--config), a local diffusers directory "
                              f"of the same architecture (its configs and tokenizers; weights may be left out): {where}")
        config = guess
    elif os.path.isdir(config):
        if not os.path.isfile(os.path.join(config, "model_index.json")):
            raise ConfigError(f"config {config}: not a diffusers directory (no model_index.json)")
        check_pipeline_dir(config)
    else:
        check_hub_id(config, "config", "not a local diffusers directory")
    cls = pipeline_class_of(config)  # a hub config: its index is fetched (the hub may be used here)
    if cls not in SINGLE_FILE_PIPELINES:
        raise ConfigError(f"config {config} is a {cls}; single-file checkpoints load as "
                          f"{' or '.join(SINGLE_FILE_PIPELINES)} here (convert others with diffusers and pass the directory)")
    prefix = FAMILY_PREFIXES[cls]
    if shapes is not None and not any(key.startswith(prefix) for key in shapes):
        others = [name for name, p in FAMILY_PREFIXES.items() if any(key.startswith(p) for key in shapes)]
        looks = f"its text encoders are a {others[0]}'s" if others else "it has no text encoders"
        raise ConfigError(f"{path}: config {config} is a {cls}, but {looks} (no {prefix}* weights); give the config "
                          "of the checkpoint's own architecture")
    return SingleFile(path, config)


def load_single_file(spec: SingleFile, dtype):
    """The pipeline of a single-file checkpoint, converted with its config's component configs."""
    import diffusers

    cls = getattr(diffusers, pipeline_class_of(spec.config))
    pipe = cls.from_single_file(spec.path, config=spec.config, torch_dtype=dtype,
                                local_files_only=os.path.isdir(spec.config))
    _check_all_loaded(pipe, spec.path)
    return pipe


def _check_all_loaded(pipe, path: str) -> None:
    """diffusers loads text encoders non-strictly: a weight the file lacks stays an empty
    (meta) placeholder, and an SDXL file whose two text encoders are equally wide fills the
    second with the first's weights, leaving its projection empty. Refuse both by name."""
    import torch
    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():  # without it diffusers fills what is missing with random weights
        raise ConfigError("single-file checkpoints need accelerate (pip install accelerate): without it a weight "
                          "the file lacks would silently be random")
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for key, tensor in list(component.named_parameters()) + list(component.named_buffers()):
            if tensor.is_meta:
                raise ConfigError(f"{path}: no weights for {name}.{key} after conversion (a checkpoint without that "
                                  "part, or an SDXL file whose two text encoders diffusers could not tell apart)")
