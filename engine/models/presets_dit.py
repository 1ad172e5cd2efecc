"""Built-in random-weight DiT presets: `tiny-pixart`, `tiny-sd3`, `tiny-flux`.

Same rules as the UNet presets in `engine.models.presets`: seeded, built in a fixed order, so every
build is bit-identical; char-level tokenizers that need no files (the pipelines do not
check tokenizer classes, and a T5 tokenizer would need sentencepiece or a tokenizer file).
Every transformer has 32 hidden dims (2 heads x 16) so a 20-step generation takes seconds
on a CPU. Shared parts come from `engine.models.tiny_parts`.
"""

from __future__ import annotations

import torch

from engine.models.tiny_parts import PRESET_SEED, clip_config, eval_mode, tiny_tokenizer, tiny_vae

# The VAE latent statistics of the real models (decode_latents and the pipelines read them).
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)


def _t5_encoder(vocab_size: int, d_model: int = 32):
    """A tiny T5 v1.1-style encoder (gated GELU), the text encoder of PixArt and Flux."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,  # T5 defaults to 0.1
        pad_token_id=1,  # the char-level tokenizer pads with <|endoftext|>
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _flow_vae(factors: dict):
    """The 16-channel VAE of SD3 and Flux: no quant convs, latents scaled and shifted."""

    return tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **factors)


def build_tiny_pixart():
    """PixArt-Sigma-style: adaLN-single DiT, self-attention + cross-attention to T5 tokens."""
    from diffusers import PixArtTransformer2DModel

    return pixart_pipeline(lambda: PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels
        num_layers=2,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=32,  # 256 px; one of the sizes the pipeline's resolution binning knows
        patch_size=2,
    ))


def pixart_pipeline(make_transformer):
    """A PixArt-Sigma pipeline around `make_transformer()`: a tiny T5 (width 32), a tiny VAE
    and PixArt-Sigma's own scheduler config, built in a fixed order from PRESET_SEED."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline


    torch.manual_seed(PRESET_SEED)
    tokenizer = tiny_tokenizer()
    text_encoder = _t5_encoder(len(tokenizer))
    transformer = make_transformer()
    vae = tiny_vae()
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        solver_order=2,
        algorithm_type="dpmsolver++",
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return eval_mode(pipe)


def build_tiny_sd3():
    """SD3-style MMDiT: joint attention over image and text tokens; two CLIP encoders and a
    T5 (the pipeline accepts text_encoder_3=None, but from_pretrained cannot reload that)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection


    torch.manual_seed(PRESET_SEED)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()
    tokenizer_3 = tiny_tokenizer()
    text_encoder = CLIPTextModelWithProjection(clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(len(tokenizer_2)))
    text_encoder_3 = _t5_encoder(len(tokenizer_3), d_model=64)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5 width, >= the two CLIP hidden states side by side
        caption_projection_dim=32,  # = the transformer width
        pooled_projection_dim=64,  # the two CLIP projections side by side
        pos_embed_max_size=96,  # latents up to 192 rows (1536 px)
    )
    vae = _flow_vae(SD3_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    texts = dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **texts,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return eval_mode(pipe)


def build_tiny_flux():
    """FLUX.1-dev-style: 1 double-stream + 1 single-stream block, guidance embedding (no CFG
    batch), latents packed 2x2 into 64-channel tokens, RoPE over (text, row, column)."""
    from diffusers import FluxTransformer2DModel

    return flux_pipeline(lambda: FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width
        pooled_projection_dim=32,  # CLIP pooled output width
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim
    ))


def flux_pipeline(make_transformer):
    """A Flux pipeline around `make_transformer()`: a tiny CLIP and T5 (width 32), a tiny
    16-channel VAE and FLUX.1-dev's scheduler, built in a fixed order from PRESET_SEED."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel


    torch.manual_seed(PRESET_SEED)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()
    text_encoder = CLIPTextModel(clip_config(len(tokenizer)))
    text_encoder_2 = _t5_encoder(len(tokenizer_2))
    transformer = make_transformer()
    vae = _flow_vae(FLUX_VAE)
    # FLUX.1-dev's scheduler config: the shift grows with the token count (mu).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    texts = dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, **texts)
    return eval_mode(pipe)
