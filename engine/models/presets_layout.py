"""Layout presets: a published denoiser's exact module graph at narrow widths.

`sdxl-layout`, `pixart-layout` and `flux-layout` keep every structural field of the published
denoiser config (the same fields as `benchmarks/model_configs/*.json`: block types, layers per
block, transformer depth per level, number of transformer / single-stream blocks, norm types,
attention kinds, patch size, sample size) and narrow only widths: channels, attention heads,
cross-attention / text widths, MLP widths (which follow the channels). So they run the same
layers, hooks and calls per step as the real model (what host cost depends on) in seconds on
a CPU. Text encoders and VAEs are the tiny ones of the other random presets.

Same rules as the other random presets: seeded and built in a fixed order, so every rank gets
bit-identical weights. `PUBLISHED` names the published structure each one keeps and
`NARROWED` the config fields it changes (a test checks every other field against the
published config and the module graphs against the published model on the `meta` device).
"""

from __future__ import annotations

from engine.models.presets_dit import flux_pipeline, pixart_pipeline
from engine.models.tiny_parts import eval_mode, sdxl_pipeline


# Published denoiser configs (benchmarks/model_configs) whose structure each preset keeps.
PUBLISHED = {
    "sdxl-layout": "sdxl-unet.json",
    "pixart-layout": "pixart-sigma.json",
    "flux-layout": "flux1-dev.json",
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: structure (and sizes that are not widths).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),  # the mid block takes the last: 10
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
)
# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json.
PIXART_SIGMA = dict(
    num_layers=28,
    in_channels=4,
    out_channels=8,  # learned sigma
    patch_size=2,
    sample_size=128,
    interpolation_scale=2,
    activation_fn="gelu-approximate",
    attention_bias=True,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    num_embeds_ada_norm=1000,
    use_additional_conditions=False,
)
# black-forest-labs/FLUX.1-dev transformer/config.json.
FLUX1_DEV = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 packing
    num_layers=19,  # double-stream (joint attention) blocks
    num_single_layers=38,  # single-stream blocks
    guidance_embeds=True,
)

# The fields each preset narrows (published value -> here), all widths.
NARROWED = {
    "sdxl-layout": {
        "block_out_channels": ((320, 640, 1280), (32, 64, 128)),  # 32 groups stay valid: 1, 2, 4 channels each
        "attention_head_dim": ((5, 10, 20), (2, 4, 8)),  # heads per level (diffusers' name): head dim 64 -> 16
        "cross_attention_dim": (2048, 64),  # the two text encoders' hidden states side by side
        "addition_time_embed_dim": (256, 8),
        "projection_class_embeddings_input_dim": (2816, 6 * 8 + 32),  # 6 time ids + pooled text
    },
    "pixart-layout": {
        "num_attention_heads": (16, 2),
        "attention_head_dim": (72, 16),  # width 1152 -> 32
        "cross_attention_dim": (1152, 32),  # = the width
        "caption_channels": (4096, 32),  # T5 width
    },
    "flux-layout": {
        "num_attention_heads": (24, 2),
        "attention_head_dim": (128, 16),  # width 3072 -> 32
        "axes_dims_rope": ((16, 56, 56), (4, 6, 6)),  # sums to the head dim
        "joint_attention_dim": (4096, 32),  # T5 width
        "pooled_projection_dim": (768, 32),  # CLIP pooled width
    },
}


def _narrowed(name: str) -> dict:
    return {key: new for key, (_, new) in NARROWED[name].items()}


def build_sdxl_layout():
    """SDXL base's UNet graph: 3 levels, 2 resnets per down level (3 per up level), transformer
    depth 1 / 2 / 10 (level 1 has none; the mid block has 10): 70 self-attention layers,
    70 cross-attention layers; channels 32 / 64 / 128 with 32 GroupNorm groups; two tiny CLIPs."""
    from diffusers import UNet2DConditionModel

    return eval_mode(sdxl_pipeline(lambda: UNet2DConditionModel(**SDXL_UNET, **_narrowed("sdxl-layout"))))


def build_pixart_layout():
    """PixArt-Sigma XL/2's transformer graph: 28 adaLN-single blocks, each self-attention +
    cross-attention to T5 tokens + MLP; width 32 (2 heads x 16); a tiny T5."""
    from diffusers import PixArtTransformer2DModel

    return pixart_pipeline(lambda: PixArtTransformer2DModel(**PIXART_SIGMA, **_narrowed("pixart-layout")))


def build_flux_layout():
    """FLUX.1-dev's transformer graph: 19 double-stream (joint attention) blocks and 38
    single-stream blocks, guidance embedding; width 32 (2 heads x 16); a tiny CLIP and T5."""
    from diffusers import FluxTransformer2DModel

    return flux_pipeline(lambda: FluxTransformer2DModel(**FLUX1_DEV, **_narrowed("flux-layout")))
