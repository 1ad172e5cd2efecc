"""Built-in model presets.

- Random presets (`tiny-sd`, `tiny-sdxl`; the DiTs `tiny-pixart`, `tiny-sd3`, `tiny-flux`
  in `engine.models.presets_dit`) are built offline from configs with seeded random
  weights: every rank that builds one gets bit-identical weights (same seed, same
  construction order). They exist for fast exactness tests; their images are noise-like.
- Layout presets (`sdxl-layout`, `pixart-layout`, `flux-layout`, in `engine.models.presets_layout`)
  are random presets with a published denoiser's exact module graph at narrow widths: they
  make the same layers and calls per step as the real model (what host cost depends on).
- Trained presets (`shapes-sd`) are diffusers directories shipped in `engine/models/weights/`,
  trained by `engine/models/train_shapes.py`. They are what fidelity is measured on.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from engine.models.info import ModelInfo
from engine.models.tiny_parts import PRESET_SEED, TINY_UNET, clip_config, sdxl_pipeline, tiny_tokenizer, tiny_vae
from engine.models.presets_dit import build_tiny_flux, build_tiny_pixart, build_tiny_sd3
from engine.models.presets_layout import build_flux_layout, build_pixart_layout, build_sdxl_layout

def build_tiny_sd():
    """SD 1.x-style: UNet2DConditionModel with cross-attention, VAE, one CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(PRESET_SEED)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(clip_config(len(tokenizer)))
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = tiny_vae()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl():
    """SDXL-style: `text_time` added conditioning, two text encoders, linear projections."""
    from diffusers import UNet2DConditionModel

    time_dim = 8
    return sdxl_pipeline(lambda: UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32,
        cross_attention_dim=64,
    ))


PRESETS: dict[str, Callable] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-pixart": build_tiny_pixart,
    "tiny-sd3": build_tiny_sd3,
    "tiny-flux": build_tiny_flux,
    "sdxl-layout": build_sdxl_layout,
    "pixart-layout": build_pixart_layout,
    "flux-layout": build_flux_layout,
}


# What request validation needs, known without building the weights (a test checks that
# these agree with the built models): VAE factor 8, three UNet levels (factor 4), 256 px.
# DiTs align to one row of tokens: the patch size, or 2 for Flux's 2x2 latent packing.
# FluxPipeline's default size is 1024 px whatever the transformer (default_sample_size is
# fixed at 128), and it never batches uncond + cond: FLUX.1-dev embeds the guidance scale.
PRESET_INFO = {
    "tiny-sd": ModelInfo("tiny-sd", "StableDiffusionPipeline", 8, 4, 256),
    "tiny-sdxl": ModelInfo("tiny-sdxl", "StableDiffusionXLPipeline", 8, 4, 256),
    "tiny-pixart": ModelInfo("tiny-pixart", "PixArtSigmaPipeline", 8, 2, 256),
    "tiny-sd3": ModelInfo("tiny-sd3", "StableDiffusion3Pipeline", 8, 2, 256, latent_channels=16),
    "tiny-flux": ModelInfo("tiny-flux", "FluxPipeline", 8, 2, 1024, does_cfg=False, latent_channels=16),
    # Layout presets keep the published sample sizes: 1024 px by default, as the real models.
    "sdxl-layout": ModelInfo("sdxl-layout", "StableDiffusionXLPipeline", 8, 4, 1024),
    "pixart-layout": ModelInfo("pixart-layout", "PixArtSigmaPipeline", 8, 2, 1024),
    "flux-layout": ModelInfo("flux-layout", "FluxPipeline", 8, 2, 1024, does_cfg=False, latent_channels=16),
}

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
# Trained presets: name -> diffusers directory (described from its config files).
TRAINED_PRESETS = {"shapes-sd": os.path.join(WEIGHTS_DIR, "shapes-sd")}
