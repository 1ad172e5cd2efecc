"""The add-on workflows: img2img, inpainting, ControlNet and LoRA adapters, on any image strategy.

Caller side, `check_workflow` validates what a request adds (before any rank starts).
Rank side, `pipeline_for` picks the diffusers pipeline for the request's inputs, built once
with `from_pipe` from the loaded components (the same patch-parallel denoiser, VAE and text
encoders), and `call_kwargs` gives its extra arguments.
"""

from __future__ import annotations

import math

import numpy as np

from engine.inputs import is_latents, latent_array, mask_array, rgb_array, to_pil
from parallel.config import is_number
from parallel.errors import ConfigError

# Base pipeline -> the workflows this engine runs with it (diffusers has the pipeline and
# the parallel layers cover its models). SD3/Flux ControlNets are other model classes.
WORKFLOWS = {
    "StableDiffusionPipeline": ("img2img", "inpaint", "controlnet"),
    "StableDiffusionXLPipeline": ("img2img", "inpaint", "controlnet"),
    "StableDiffusionXLImg2ImgPipeline": ("img2img", "inpaint"),  # the SDXL refiner: image in, never text alone
    "StableDiffusion3Pipeline": ("img2img", "inpaint"),
    "FluxPipeline": ("img2img", "inpaint"),
}


def _finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


def workflow_of(image: bool, mask: bool) -> str:
    return "inpaint" if mask else "img2img" if image else "text2img"


def _fraction(value, what: str, low_open: bool = True) -> float:
    if not _finite(value) or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ConfigError(f"{what} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return float(value)


def _supports(info, what: str) -> None:
    if what not in WORKFLOWS.get(info.pipeline, ()):
        have = ", ".join(WORKFLOWS.get(info.pipeline, ())) or "none"
        raise ConfigError(f"{info.name} ({info.pipeline}) does not run {what} here (it supports: {have})")


# Pipelines that hand over between a base and a refiner (denoising_end / denoising_start).
HANDOFF_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
IMAGE_ONLY_PIPELINES = ("StableDiffusionXLImg2ImgPipeline",)
# Base pipeline -> the family prefix of diffusers' pipeline class names (for the options check).
_FAMILIES = {"StableDiffusionPipeline": "StableDiffusion", "StableDiffusionXLPipeline": "StableDiffusionXL",
             "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXL", "StableDiffusion3Pipeline": "StableDiffusion3",
             "FluxPipeline": "Flux", "PixArtSigmaPipeline": "PixArtSigma"}
_KINDS = {"text2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}


def pipeline_class_name(base: str, kind: str, controlnet: bool) -> str | None:
    """The diffusers pipeline `pipeline_for` will build (None for a base this table does not know)."""
    family = _FAMILIES.get(base)
    return None if family is None else f"{family}{'ControlNet' if controlnet else ''}{_KINDS[kind]}Pipeline"


def check_pipeline_options(info, kind: str, controlnet: bool, options: dict) -> None:
    """Refuse options the chosen pipeline would silently swallow (its **kwargs) or reject on
    the ranks. `options`: name -> whether the request sets it."""
    wanted = [name for name, used in options.items() if used]

    def shown(names):
        return ", ".join("callback (previews)" if n == "callback_on_step_end" else n for n in names)

    name = pipeline_class_name(info.pipeline, kind, controlnet)
    if name is None or not wanted:
        return
    import inspect

    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        return
    takes = inspect.signature(cls.__call__).parameters
    missing = [n for n in wanted if n not in takes]
    if missing:
        raise ConfigError(f"{name} does not take {shown(missing)}; it would be ignored")


def fit_to_size(info, image: np.ndarray | None, mask: np.ndarray | None, height: int, width: int):
    """The init image and mask at the request's size: img2img pipelines take the image's own
    size (an explicit height/width would be ignored), so a different size is resized here.
    Latents cannot be resized: a different size is refused."""
    from PIL import Image

    if image is None:
        return image, mask
    if image_size(info, image) != (height, width):
        if image.ndim == 4:
            raise ConfigError(f"height/width {height}x{width} differ from the latents' size; leave them out")
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))
    if mask is not None and mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
    return image, mask


def image_size(info, image: np.ndarray) -> tuple[int, int]:
    """(height, width) in pixels of an init image or of handed-over latents."""
    if image.ndim == 4:
        return image.shape[2] * info.vae_scale_factor, image.shape[3] * info.vae_scale_factor
    return image.shape[0], image.shape[1]


def _check_handoff(info, image, denoising_start, denoising_end) -> dict:
    for what, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None:
            if info.pipeline not in HANDOFF_PIPELINES:
                raise ConfigError(f"{what} hands over between an SDXL base and refiner; {info.name} is a {info.pipeline}")
            if not is_number(value) or not 0 < value < 1:
                raise ConfigError(f"{what} must be a number in (0, 1), got {value!r}")
    if denoising_start is not None and image is None:
        raise ConfigError("denoising_start needs image: the latents (or picture) the refiner continues from")
    if denoising_start is not None and denoising_end is not None and denoising_end <= denoising_start:
        raise ConfigError(f"denoising_end {denoising_end} must come after denoising_start {denoising_start}")
    return {"denoising_start": None if denoising_start is None else float(denoising_start),
            "denoising_end": None if denoising_end is None else float(denoising_end)}


def check_workflow(info, image, mask_image, strength, controlnets, control_image, scales,
                   guidance_rescale, adapters, loaded_adapters, denoising_start=None, denoising_end=None) -> dict:
    """The request's add-on fields, validated and converted (images to uint8 arrays)."""
    out = {"image": None, "mask_image": None, "strength": None, "controlnets": (), "control_images": (),
           "controlnet_scales": (), "guidance_rescale": _fraction(guidance_rescale, "guidance_rescale", False),
           "adapters": None, **_check_handoff(info, image, denoising_start, denoising_end)}
    if image is not None:
        out["image"] = latent_array(image, info.latent_channels) if is_latents(image) else rgb_array(image, "image")
    if mask_image is not None:
        if image is None:
            raise ConfigError("mask_image needs image (the picture to inpaint)")
        out["mask_image"] = mask_array(mask_image)
    kind = workflow_of(image is not None, mask_image is not None)
    if kind != "text2img":
        _supports(info, kind)
        # None: the pipeline's own default (0.8 SD img2img, 0.3 SDXL img2img, 0.6 SD3/Flux ...)
        out["strength"] = None if strength is None else _fraction(strength, "strength")
    elif strength is not None:
        raise ConfigError("strength needs image (img2img or inpainting); it would be ignored")
    elif info.pipeline in IMAGE_ONLY_PIPELINES:
        raise ConfigError(f"{info.name} is a {info.pipeline} (an SDXL refiner): it needs image (e.g. a base's latents)")

    specs = (controlnets,) if isinstance(controlnets, str) else tuple(controlnets or ())
    images = control_image if isinstance(control_image, (list, tuple)) else () if control_image is None else (control_image,)
    if not specs and not images and scales != 1.0:
        raise ConfigError("controlnet_conditioning_scale needs a controlnet; it would be ignored")
    if specs or images:
        _supports(info, "controlnet")
        if len(specs) != len(images):
            raise ConfigError(f"{len(specs)} ControlNet(s) but {len(images)} control image(s): give one image per ControlNet")
        from engine.models.controlnets import check_controlnet_spec

        for spec in specs:
            check_controlnet_spec(spec)
        scale_list = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(specs)
        if len(scale_list) != len(specs):
            raise ConfigError(f"{len(scale_list)} controlnet_conditioning_scale value(s) for {len(specs)} ControlNet(s)")
        for s in scale_list:
            if not _finite(s):
                raise ConfigError(f"controlnet_conditioning_scale must be finite numbers, got {s!r}")
        out.update(controlnets=specs, controlnet_scales=tuple(float(s) for s in scale_list),
                   control_images=tuple(rgb_array(img, f"control_image[{i}]") for i, img in enumerate(images)))

    if adapters is not None:
        if not isinstance(adapters, dict):
            raise ConfigError("adapters must be a dict {name: weight}")
        for name, weight in adapters.items():
            if name not in loaded_adapters:
                raise ConfigError(f"adapter {name!r} is not loaded (loaded: {', '.join(loaded_adapters) or 'none'}); "
                                  "call engine.load_lora first")
            if not _finite(weight):
                raise ConfigError(f"adapter {name!r}: weight must be a finite number, got {weight!r}")
        out["adapters"] = tuple((name, float(w)) for name, w in adapters.items())
    return out


def check_ip_adapter_image(image, loaded: bool):
    """The image prompt of a loaded IP-Adapter, as a uint8 array (None without one)."""
    if image is None:
        if loaded:
            raise ConfigError("an IP-Adapter is loaded: pass ip_adapter_image, or engine.unload_ip_adapter() first")
        return None
    if not loaded:
        raise ConfigError("ip_adapter_image needs an IP-Adapter: call engine.load_ip_adapter(...) first")
    return rgb_array(image, "ip_adapter_image")


def check_ip_adapter(source, scale, info) -> None:
    """An IP-Adapter the ranks can load: a preset, a directory, or a hub id."""
    import os

    from engine.models.ip_adapters import IP_ADAPTER_PRESETS

    if info.pipeline not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ConfigError(f"{info.name}: IP-Adapters are supported on SD 1.x and SDXL pipelines, not {info.pipeline}")
    if not _finite(scale):
        raise ConfigError(f"IP-Adapter scale must be a finite number, got {scale!r}")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"IP-Adapter: give a preset ({', '.join(IP_ADAPTER_PRESETS)}), a directory or a hub id")
    if source in IP_ADAPTER_PRESETS or os.path.isdir(source):
        return
    from engine.models.loading import check_hub_id

    check_hub_id(source, "IP-Adapter", f"not a preset ({', '.join(IP_ADAPTER_PRESETS)}), not a directory")


def check_lora(name, source, weight, info) -> None:
    """A LoRA adapter the ranks can load: a named file or directory that exists, or a state dict."""
    import os

    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"adapter name must be an identifier-like string, got {name!r}")
    if not hasattr(info, "pipeline") or info.pipeline not in WORKFLOWS:
        raise ConfigError(f"{getattr(info, 'name', info)}: LoRA adapters are supported on {', '.join(WORKFLOWS)}")
    if not _finite(weight):
        raise ConfigError(f"adapter {name!r}: weight must be a finite number, got {weight!r}")
    if isinstance(source, dict):
        if not source:
            raise ConfigError(f"adapter {name!r}: the state dict is empty")
        return
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"adapter {name!r}: give a path, a hub id or a state dict, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        from engine.models.loading import check_hub_id

        check_hub_id(path, f"adapter {name!r} source", "it does not exist")


def check_setup(setup, model: str) -> None:
    """A per-rank setup function the ranks can receive: callable and picklable."""
    if setup is None:
        return
    if not callable(setup):
        raise ConfigError(f"setup must be a function taking the pipeline, got {type(setup).__name__}")
    from engine.models.video import is_video_model

    if is_video_model(model):
        raise ConfigError(f"{model} is a streaming video model: setup= applies to image pipelines")
    import pickle

    try:
        pickle.dumps(setup)
    except Exception as exc:  # lambdas, closures, functions defined in __main__ of an interactive session
        raise ConfigError(f"setup must be picklable to reach spawned ranks (a top-level function in a module): {exc}") from None


def pipeline_for(pipe, request, controlnet, cache: dict):
    """The diffusers pipeline for the request's workflow, sharing `pipe`'s components;
    `controlnet`: None, a ControlNetModel or a MultiControlNetModel."""
    kind = request.workflow
    if kind == "text2img" and controlnet is None:
        return pipe
    key = (kind, id(controlnet))
    if key not in cache:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        auto = {"text2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
                "inpaint": AutoPipelineForInpainting}[kind]
        extra = {"controlnet": controlnet} if controlnet is not None else {}
        cache[key] = auto.from_pipe(pipe, **extra)
    variant = cache[key]
    variant.scheduler = pipe.scheduler  # the request's scheduler, set on the base pipeline
    return variant


def denoiser_calls_run(pipe, request) -> int:
    """How often `pipe` (the workflow's pipeline) will call the denoiser for the request:
    img2img and inpainting start part-way (at the strength's step, or a refiner's
    denoising_start), and a base stops at denoising_end. Asked of the pipeline's own
    get_timesteps on a copy of its scheduler, since families round differently."""
    import inspect

    from parallel.asg import denoiser_calls

    steps = request.num_inference_steps
    probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
    try:
        probe.set_timesteps(steps)
    except (TypeError, ValueError):  # wants more than a step count (e.g. dynamic shifting's mu)
        return denoiser_calls(pipe.scheduler, steps)
    timesteps = probe.timesteps
    if request.image is not None and hasattr(pipe, "get_timesteps"):
        strength = request.strength
        if strength is None:  # the pipeline's own default
            strength = inspect.signature(type(pipe).__call__).parameters["strength"].default
        takes_start = "denoising_start" in inspect.signature(pipe.get_timesteps).parameters
        extra = {"denoising_start": request.denoising_start} if takes_start else {}
        saved, pipe.scheduler = pipe.scheduler, probe
        try:
            timesteps = pipe.get_timesteps(steps, strength, "cpu", **extra)[0]
        finally:
            pipe.scheduler = saved
    if request.denoising_end is not None:  # as the SDXL pipelines cut their loop
        total = probe.config.num_train_timesteps
        cutoff = int(round(total - request.denoising_end * total))
        timesteps = [t for t in timesteps if t >= cutoff]
    return len(timesteps)


def call_kwargs(request) -> dict:
    """The pipeline arguments of the request's add-ons."""
    kwargs = {}
    if request.image is not None:
        import torch

        image = request.image
        kwargs["image"] = torch.from_numpy(image) if image.ndim == 4 else to_pil(image)
        if request.strength is not None:
            kwargs["strength"] = request.strength
    for key in ("denoising_start", "denoising_end"):
        if getattr(request, key) is not None:
            kwargs[key] = getattr(request, key)
    if request.mask_image is not None:
        kwargs["mask_image"] = to_pil(request.mask_image)
    if request.controlnets:
        images = [to_pil(img) for img in request.control_images]
        scales = list(request.controlnet_scales)
        single = len(images) == 1
        # ControlNet img2img/inpaint pipelines take the condition as control_image
        key = "control_image" if request.image is not None else "image"
        kwargs[key] = images[0] if single else images
        kwargs["controlnet_conditioning_scale"] = scales[0] if single else scales
    if request.ip_adapter_image is not None:
        kwargs["ip_adapter_image"] = to_pil(request.ip_adapter_image)
    if request.guidance_rescale:
        kwargs["guidance_rescale"] = request.guidance_rescale
    return kwargs
