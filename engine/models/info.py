"""ModelInfo: the facts about a model that request validation needs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What request validation needs to know about a loaded model (picklable)."""

    name: str
    pipeline: str
    vae_scale_factor: int
    align: int  # latent rows per smallest patch band (UNet downsampling factor; DiT: rows per token row)
    native_size: int  # default height/width in pixels
    does_cfg: bool = True  # False for guidance-embedded models (LCM UNets, Flux): never batch uncond/cond
    latent_channels: int = 4  # the VAE's (16 for SD3 and Flux)

    @property
    def pixel_align(self) -> int:
        return self.vae_scale_factor * self.align
