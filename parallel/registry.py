"""From a strategy name and a pipeline to the parallel implementation that serves it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from parallel.config import ConfigError
from parallel.context import PatchContext
from parallel.unet import downsampling_factor, parallelize_unet


@dataclass(frozen=True)
class Backbone:
    """How a pipeline's denoiser is made patch-parallel."""

    kind: str
    align: int  # latent rows per smallest band (the denoiser's downsampling factor)
    install: Callable[[object, PatchContext], None]


def backbone_of(pipe) -> Backbone:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return Backbone("unet", downsampling_factor(unet), lambda p, ctx: parallelize_unet(p.unet, ctx))
    raise ConfigError(
        f"{type(pipe).__name__} has no UNet2DConditionModel; patch parallelism supports UNet pipelines "
        "(SD 1.x/2.x, SDXL)"
    )
