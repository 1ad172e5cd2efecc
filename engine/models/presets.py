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
from engine.models.presets_dit import build_tiny_flux, build_tiny_pixart, build_tiny_sd3
from engine.models.presets_layout import build_flux_layout, build_pixart_layout, build_sdxl_layout

PRESET_SEED = 1234


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(max_length: int = 77):
    """A character-level CLIP tokenizer that needs no files: every byte is a token."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def _clip_config(vocab_size: int, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def _tiny_vae(latent_channels: int = 4, **config):
    """`config`: further AutoencoderKL settings (scaling/shift factors, quant convs)."""
    from diffusers import AutoencoderKL

    # Four blocks: the usual factor-8 latent, with very few channels.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **config,
    )


# What the tiny UNets (SD- and SDXL-style) share: 4-channel latents of 32 rows, three levels.
TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                 norm_num_groups=8)


def build_tiny_sd():
    """SD 1.x-style: UNet2DConditionModel with cross-attention, VAE, one CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(PRESET_SEED)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = _tiny_vae()
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


def sdxl_pipeline(make_unet: Callable):
    """An SDXL pipeline around `make_unet()`: two tiny CLIP text encoders (width 32, pooled
    32), a tiny VAE and SDXL's Euler scheduler, built in a fixed order from PRESET_SEED."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(PRESET_SEED)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer_2)))
    unet = make_unet()
    vae = _tiny_vae()
    vae.register_to_config(scaling_factor=0.13025, force_upcast=False)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


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
    "tiny-sd3": ModelInfo("tiny-sd3", "StableDiffusion3Pipeline", 8, 2, 256),
    "tiny-flux": ModelInfo("tiny-flux", "FluxPipeline", 8, 2, 1024, does_cfg=False),
    # Layout presets keep the published sample sizes: 1024 px by default, as the real models.
    "sdxl-layout": ModelInfo("sdxl-layout", "StableDiffusionXLPipeline", 8, 4, 1024),
    "pixart-layout": ModelInfo("pixart-layout", "PixArtSigmaPipeline", 8, 2, 1024),
    "flux-layout": ModelInfo("flux-layout", "FluxPipeline", 8, 2, 1024, does_cfg=False),
}

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
# Trained presets: name -> diffusers directory (described from its config files).
TRAINED_PRESETS = {"shapes-sd": os.path.join(WEIGHTS_DIR, "shapes-sd")}
