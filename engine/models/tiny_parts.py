"""What the random presets share: the seed, a file-free tokenizer, tiny CLIP/VAE configs,
the SDXL pipeline frame, and eval mode. Every preset module imports from here (no cycles)."""

from __future__ import annotations

from typing import Callable

import torch

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


def clip_config(vocab_size: int, hidden: int = 32, projection_dim: int = 32):
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


def tiny_vae(latent_channels: int = 4, **config):
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


def eval_mode(pipe):
    """Inference mode, as from_pretrained leaves a model: modules built from a config start
    in training mode, where dropout would draw from the global RNG on every call."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def sdxl_pipeline(make_unet: Callable):
    """An SDXL pipeline around `make_unet()`: two tiny CLIP text encoders (width 32, pooled
    32), a tiny VAE and SDXL's Euler scheduler, built in a fixed order from PRESET_SEED."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(PRESET_SEED)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()
    text_encoder = CLIPTextModel(clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(len(tokenizer_2)))
    unet = make_unet()
    vae = tiny_vae()
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
