"""Final latents in the (B, C, H/vae, W/vae) layout the VAE decodes, whatever the pipeline."""

from __future__ import annotations

import torch


def spatial_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`latents` as a pipeline returns them with output_type="latent", made spatial.

    UNet, PixArt and SD3 pipelines return spatial latents already (identity). Flux-style
    pipelines return 2x2 patches packed into tokens, (B, H*W/4, 4C); they are unpacked
    with the pipeline's own `_unpack_latents`, so its layout is never duplicated here.
    """
    if latents.ndim == 4:
        return latents
    unpack = getattr(pipe, "_unpack_latents", None)
    if latents.ndim != 3 or unpack is None:
        raise ValueError(f"{type(pipe).__name__}: cannot make latents of shape {tuple(latents.shape)} spatial")
    return unpack(latents, height, width, pipe.vae_scale_factor)
