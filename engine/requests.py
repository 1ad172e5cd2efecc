"""GenerateRequest: one validated generation, resolved against the model and the world.

Validation is pure (it depends only on the arguments, the model's facts and the world
size), so every rank that runs it reaches the same verdict: bad input fails everywhere,
before any collective, and never hangs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

from engine.models import ModelInfo, resolve_scheduler
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
        resolve_scheduler(scheduler)

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
    )
