"""From a pipeline to the parallel implementation of its denoiser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from parallel.config import ConfigError
from parallel.patch.context import PatchContext

# Transformer classes whose self-attention processors parallel.patch.dit knows.
TRANSFORMERS = ("PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")


@dataclass(frozen=True)
class Backbone:
    """How a pipeline's denoiser is made patch-parallel."""

    align: int  # latent rows per smallest band (UNet downsampling factor; DiT rows per token row)
    install: Callable[[object, PatchContext], None]


def backbone_of(pipe) -> Backbone:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        from parallel.patch.unet import downsampling_factor, parallelize_unet

        return Backbone(downsampling_factor(unet), lambda p, ctx: parallelize_unet(p.unet, ctx))
    transformer = getattr(pipe, "transformer", None)
    if type(transformer).__name__ in TRANSFORMERS:
        from parallel.patch.dit import parallelize_transformer, token_scale

        return Backbone(token_scale(transformer), lambda p, ctx: parallelize_transformer(p.transformer, ctx))
    raise ConfigError(
        f"{type(pipe).__name__}: patch parallelism supports UNet2DConditionModel pipelines (SD 1.x/2.x, SDXL) "
        f"and the transformers {', '.join(TRANSFORMERS)}"
    )
