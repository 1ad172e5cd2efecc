"""GenerateRequest: one validated generation, resolved against the model and the world.

Validation is pure (it depends only on the arguments, the model's facts and the world
size), so every rank that runs it reaches the same verdict: bad input fails everywhere,
before any collective, and never hangs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np

from engine.models import ModelInfo, resolve_scheduler
from engine.workflows import (check_ip_adapter_image, check_pipeline_options, check_workflow, fit_to_size, image_size,
                              workflow_of)
from parallel.patch.bands import BandPlan
from parallel.config import ConfigError, ParallelConfig, is_int, is_number
from parallel.registry import strategy_of


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


@dataclass(frozen=True)
class GenerateRequest:
    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...] | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    parallel: ParallelConfig  # resolved: world_size set
    cfg_split: bool
    compare_serial: bool = False
    progress: bool = True
    # Add-on workflows (engine.workflows): init image / mask, ControlNets, LoRA adapters.
    image: np.ndarray | None = None  # (H, W, 3) uint8 (img2img, inpainting) or (B, C, h, w) float32 latents
    mask_image: np.ndarray | None = None  # (H, W) uint8: inpainting, 255 = repaint
    strength: float | None = None
    controlnets: tuple[str, ...] = ()
    control_images: tuple[np.ndarray, ...] = ()
    controlnet_scales: tuple[float, ...] = ()
    guidance_rescale: float = 0.0
    num_images_per_prompt: int = 1
    cross_attention_kwargs: dict | None = None  # e.g. {"scale": 0.5}: LoRA strength in attention
    scheduler_options: tuple = ()  # (name, value) pairs for the scheduler, e.g. use_karras_sigmas
    denoising_start: float | None = None  # SDXL refiner: continue from here (image: the base's latents)
    denoising_end: float | None = None  # SDXL base: stop here and hand the latents to a refiner
    preview_every: int = 0  # rank 0 hands the caller a preview every k steps (0: none)
    preview: str = "latents"  # "latents" (the current latents) or "image" (them decoded)
    adapters: tuple[tuple[str, float], ...] | None = None  # None: every loaded adapter at its scale
    # What the ranks must hold for this request (the engine's whole adapter state, so a rank
    # that lost it to a failed request or a restart catches up): (name, source, weight), the
    # source None once every rank confirmed it; and the IP-Adapter (source, subfolder, weight
    # name, scale) or None.
    loras: tuple = ()
    ip_adapter: tuple | None = None
    release_controlnets: bool = False  # free every ControlNet the ranks hold, before this request
    ip_adapter_image: np.ndarray | None = None  # (H, W, 3) uint8: the image prompt of a loaded IP-Adapter

    @property
    def workflow(self) -> str:
        return workflow_of(self.image is not None, self.mask_image is not None)


# What a rank may set alone under torchrun: what it shows or compares, not what it computes
# with the others (previews matter to every rank under asg only: see request_digests).
RANK_LOCAL_FIELDS = ("progress", "compare_serial", "preview")


def request_digests(request: GenerateRequest) -> dict[str, str]:
    """Field name -> a digest of its value, for the fields every rank's request must share."""
    import dataclasses
    import hashlib
    import pickle

    from parallel.registry import strategy_of

    tiles = strategy_of(request.parallel).runner == "tiles"
    out = {}
    for field in dataclasses.fields(request):
        if field.name in RANK_LOCAL_FIELDS or (field.name == "preview_every" and not tiles):
            continue
        out[field.name] = hashlib.sha1(pickle.dumps(getattr(request, field.name))).hexdigest()[:16]
    return out


def _prompts(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{what} must be a string or a non-empty list of strings")
    return tuple(value)


def _positive_int(value, what: str) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


PREVIEWS = ("latents", "image")


def check_scheduler_options(options, scheduler) -> tuple:
    """Scheduler settings as (name, value) pairs; names the scheduler's constructor takes."""
    if not options:
        return ()
    if not isinstance(options, dict):
        raise ConfigError("scheduler_options must be a dict, e.g. {'use_karras_sigmas': True}")
    if scheduler is not None:
        import inspect

        accepted = inspect.signature(resolve_scheduler(scheduler).__init__).parameters
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise ConfigError(f"{scheduler} has no option {', '.join(map(repr, unknown))}")
    return tuple(sorted(options.items()))


def build_request(
    info: ModelInfo,
    parallel: ParallelConfig,
    prompt,
    height=None,
    width=None,
    num_inference_steps=20,
    guidance_scale=5.0,
    seed=0,
    negative_prompt=None,
    scheduler=None,
    compare_serial=False,
    progress=True,
    image=None,
    mask_image=None,
    strength=None,
    controlnet=(),
    control_image=None,
    controlnet_conditioning_scale=1.0,
    guidance_rescale=0.0,
    adapters=None,
    loaded_adapters=(),
    num_images_per_prompt=1,
    cross_attention_kwargs=None,
    scheduler_options=None,
    preview_every=0,
    preview="latents",
    denoising_start=None,
    denoising_end=None,
    ip_adapter_image=None,
    ip_adapter_loaded=False,
) -> GenerateRequest:
    parallel = parallel.validate()
    if getattr(info, "kind", "image") == "video":
        raise ConfigError(f"{info.name} is a streaming video model: call engine.stream(...) "
                          "(CLI: tessera stream), not generate")
    strategy = strategy_of(parallel)
    if not strategy.serves_images:
        raise ConfigError(f"strategy {parallel.strategy!r} streams video from a causal video model (e.g. tiny-causal-video); "
                          f"{info.name} is an image model")
    world = parallel.world_size or 1
    prompts = _prompts(prompt, "prompt")
    addons = check_workflow(info, image, mask_image, strength, controlnet, control_image,
                            controlnet_conditioning_scale, guidance_rescale, adapters, loaded_adapters,
                            denoising_start, denoising_end)
    if addons["image"] is not None:  # the pipelines resize it to the request's size; by default its own
        image_h, image_w = image_size(info, addons["image"])
        height = image_h if height is None else height
        width = image_w if width is None else width
    height = info.native_size if height is None else _positive_int(height, "height")
    width = info.native_size if width is None else _positive_int(width, "width")
    steps = _positive_int(num_inference_steps, "num_inference_steps")
    if not is_number(guidance_scale) or not 0 <= guidance_scale < math.inf:
        raise ConfigError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in 0..2**64-1 (the generator's range), got {seed!r}")
    guided = guidance_scale > 1.0 and info.does_cfg  # when the pipeline batches uncond + cond
    negatives = None
    if negative_prompt is not None:
        negatives = _prompts(negative_prompt, "negative_prompt")
        if not guided:
            raise ConfigError("negative_prompt needs classifier-free guidance (guidance_scale > 1); it would be ignored")
        if len(negatives) not in (1, len(prompts)):
            raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    if scheduler is not None:
        resolve_scheduler(scheduler, info.pipeline)
    options = check_scheduler_options(scheduler_options, scheduler)
    ip_image = check_ip_adapter_image(ip_adapter_image, ip_adapter_loaded)
    per_prompt = _positive_int(num_images_per_prompt, "num_images_per_prompt")
    if not is_int(preview_every) or preview_every < 0:
        raise ConfigError(f"callback_steps must be a positive integer, got {preview_every!r}")
    if preview not in PREVIEWS:
        raise ConfigError(f"preview must be one of {', '.join(PREVIEWS)}, got {preview!r}")
    if cross_attention_kwargs is not None and (
            not isinstance(cross_attention_kwargs, dict) or not all(isinstance(k, str) for k in cross_attention_kwargs)):
        raise ConfigError("cross_attention_kwargs must be a dict with string keys, e.g. {'scale': 0.5}")
    addons["image"], addons["mask_image"] = fit_to_size(info, addons["image"], addons["mask_image"], height, width)
    check_pipeline_options(info, workflow_of(addons["image"] is not None, addons["mask_image"] is not None),
                           bool(addons["controlnets"]), {
                               "guidance_rescale": addons["guidance_rescale"] > 0,
                               "cross_attention_kwargs": cross_attention_kwargs is not None,
                               "denoising_start": addons["denoising_start"] is not None,
                               "denoising_end": addons["denoising_end"] is not None,
                               "num_images_per_prompt": per_prompt > 1,
                               "ip_adapter_image": ip_image is not None,
                               "callback_on_step_end": bool(preview_every),
                           })

    vae = info.vae_scale_factor
    for what, size in (("height", height), ("width", width)):
        if size % vae:
            raise ConfigError(f"{what} {size} is not a multiple of {vae} (the VAE's downsampling factor)")
    if strategy.splits_rows:
        for what, size in (("height", height), ("width", width)):
            if size % info.pixel_align:
                raise ConfigError(
                    f"{what} {size} is not a multiple of {info.pixel_align} (VAE factor {vae} x "
                    f"denoiser downsampling or patch size {info.align}), which patch parallelism needs"
                )

    if strategy.runner == "tiles":
        from parallel.asg import asg_plan

        asg_plan(info, parallel, height, width, steps)  # raises on bad geometry

    if strategy.stale and world > 1 and parallel.warmup_steps >= steps:
        warnings.warn(f"warmup_steps={parallel.warmup_steps} covers all {steps} steps: every exchange is fresh, "
                      f"so this {parallel.strategy} run is exact (as patch-sync)", stacklevel=2)

    cfg_split = parallel.cfg_split
    if cfg_split is True:
        if not guided:
            raise ConfigError("cfg_split needs classifier-free guidance (guidance_scale > 1, a model that batches it)")
        if world % 2:
            raise ConfigError(f"cfg_split needs an even world size, got {world}")
    elif cfg_split is None:
        cfg_split = guided and world > 1 and world % 2 == 0 and strategy.splits_cfg
    members = world // 2 if cfg_split else world
    if strategy.splits_rows:
        BandPlan.split(height // vae, width // vae, members, info.align)  # raises on too many ranks
    return GenerateRequest(
        prompt=prompts,
        negative_prompt=negatives,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=float(guidance_scale),
        seed=seed,
        scheduler=scheduler,
        parallel=replace(parallel, world_size=world, cfg_split=cfg_split),
        cfg_split=cfg_split,
        compare_serial=bool(compare_serial),
        progress=bool(progress),
        num_images_per_prompt=per_prompt,
        cross_attention_kwargs=dict(cross_attention_kwargs) if cross_attention_kwargs else None,
        scheduler_options=options,
        preview_every=preview_every,
        preview=preview,
        ip_adapter_image=ip_image,
        **addons,
    )
