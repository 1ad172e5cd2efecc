"""Causal video models for streaming: the bundle, the few-step schedule, the preset.

A `VideoModel` holds what a stream needs: the chunk-causal transformer
(`engine.models.causal_video.CausalWanTransformer`), a Wan video VAE, a text encoder with its
tokenizer, and the stream settings (`StreamSpec`: chunk length, frame size, steps, shift,
KV window). It comes from the built-in preset `tiny-causal-video` (seeded random weights,
bit-identical on every build) or from a local directory laid out like a diffusers pipeline:

    stream_config.json          the StreamSpec fields
    transformer/                CausalWanTransformer or WanTransformer3DModel (same weights)
    vae/                        AutoencoderKLWan
    text_encoder/, tokenizer/   transformers models (any encoder with last_hidden_state)

`save_video_model` writes that layout. Frames: each chunk is decoded on its own (the VAE's
causal temporal cache starts empty per chunk), in [0, 1], shape (F, H, W, 3).

The schedule (`flow_sigmas`): T steps of flow matching with shift s, sigma_k =
s u / (1 + (s - 1) u) with u = 1 - k / T, so sigma_0 = 1 (noise) and sigma_T = 0; the
model predicts the flow v and a step is x <- x + (sigma_{k+1} - sigma_k) v (Euler).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from parallel.config import ConfigError

VIDEO_PRESETS = ("tiny-causal-video",)
MAX_STEPS = 8  # few-step (distilled) schedules: T = 1..8


@dataclass(frozen=True)
class StreamSpec:
    frames_per_chunk: int = 2  # latent frames per chunk
    height: int = 64  # frame size in pixels (default for requests)
    width: int = 64
    steps: int = 4  # default T
    shift: float = 5.0
    kv_window: int = 2  # chunks kept besides the sink
    max_steps: int = MAX_STEPS


def wan_vae_factor(dim_mult) -> int:
    """Pixels per latent pixel of a Wan VAE: one downsampling between consecutive levels."""
    return 2 ** (len(dim_mult) - 1)


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) noise levels from 1 down to 0, float64."""
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift * u / (1.0 + (shift - 1.0) * u)


@dataclass
class VideoModel:
    transformer: object
    vae: object
    text_encoder: object
    tokenizer: object
    spec: StreamSpec
    name: str

    @property
    def vae_factor(self) -> int:
        return wan_vae_factor(self.vae.config.dim_mult)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def num_layers(self) -> int:
        return len(self.transformer.blocks)

    def to(self, device) -> "VideoModel":
        for m in (self.transformer, self.vae, self.text_encoder):
            m.to(device)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompt: str, device) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device)).last_hidden_state

    @torch.no_grad()
    def decode(self, latent: torch.Tensor):
        """One chunk's latent (1, C, F, h, w) -> frames (F, H, W, 3) float32 in [0, 1], numpy."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, dtype=latent.dtype, device=latent.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=latent.dtype, device=latent.device).view(1, -1, 1, 1, 1)
        video = self.vae.decode(latent * std + mean).sample  # (1, 3, F, H, W) in [-1, 1]
        return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()


def _seeded(seed: int, build):
    """Build modules under a fixed seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_causal_video() -> VideoModel:
    """`tiny-causal-video`: 4 Wan blocks of 64 dims (4 heads x 16), a 4-channel Wan VAE with
    spatial factor 4 and no temporal compression, a tiny T5 text encoder; seeded weights.
    The transformer is the larger part, as in real video models (a step costs about a
    third of a chunk's decode at 64x64 here; in Wan 1.3B a step costs more than a decode)."""
    from diffusers import AutoencoderKLWan
    from transformers import T5EncoderModel

    from engine.models.causal_video import CausalWanTransformer
    from engine.models.tiny_parts import tiny_tokenizer
    from engine.models.presets_dit import _t5_encoder

    tokenizer = tiny_tokenizer(max_length=32)
    text_encoder: T5EncoderModel = _seeded(11, lambda: _t5_encoder(len(tokenizer)))
    transformer = _seeded(12, lambda: CausalWanTransformer(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=4, cross_attn_norm=True))
    vae = _seeded(13, lambda: AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4))
    for m in (text_encoder, transformer, vae):
        m.eval()
    return VideoModel(transformer, vae, text_encoder, tokenizer, StreamSpec(), "tiny-causal-video")


def is_video_model(spec: str) -> bool:
    return spec in VIDEO_PRESETS or (isinstance(spec, str) and os.path.isfile(os.path.join(spec, "stream_config.json")))


def load_video_model(spec: str, device=None, dtype: torch.dtype | None = None) -> VideoModel:
    if spec == "tiny-causal-video":
        model = build_tiny_causal_video()
    elif is_video_model(spec):
        model = _load_dir(spec)
    else:
        raise ConfigError(f"{spec!r} is not a causal video model (a video preset: {', '.join(VIDEO_PRESETS)}, "
                          "or a directory with stream_config.json)")
    for m in (model.transformer, model.vae, model.text_encoder):
        m.eval()  # built or loaded by hand: modules start in training mode
        if dtype is not None:
            m.to(dtype)
    return model.to(device or "cpu")


def _load_dir(path: str) -> VideoModel:
    import transformers
    from diffusers import AutoencoderKLWan
    from transformers import AutoConfig, AutoTokenizer

    from engine.models.causal_video import CausalWanTransformer

    with open(os.path.join(path, "stream_config.json")) as f:
        spec = StreamSpec(**json.load(f))
    transformer = _load_transformer(CausalWanTransformer, os.path.join(path, "transformer"))
    vae = AutoencoderKLWan.from_pretrained(os.path.join(path, "vae"))
    text_dir = os.path.join(path, "text_encoder")
    arch = AutoConfig.from_pretrained(text_dir).architectures[0]  # e.g. T5EncoderModel, UMT5EncoderModel
    encoder = getattr(transformers, arch).from_pretrained(text_dir)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    for m in (transformer, vae, encoder):
        m.eval()
    return VideoModel(transformer, vae, encoder, tokenizer, spec, os.path.basename(os.path.normpath(path)))


def _load_transformer(cls, path: str):
    """Config + weights files (single or sharded). diffusers' from_pretrained refuses Wan's
    keep-in-fp32 modules without `accelerate`, which this engine does not require."""
    import glob

    from diffusers.models.model_loading_utils import load_state_dict

    model = cls.from_config(cls.load_config(path))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or sorted(glob.glob(os.path.join(path, "*.bin")))
    if not files:
        raise ConfigError(f"{path}: no weights (*.safetensors or *.bin)")
    state = {}
    for file in files:
        state.update(load_state_dict(file))
    model.load_state_dict(state, strict=True)
    return model


def save_video_model(model: VideoModel, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.transformer.save_pretrained(os.path.join(path, "transformer"))
    model.vae.save_pretrained(os.path.join(path, "vae"))
    model.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    model.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "stream_config.json"), "w") as f:
        json.dump(asdict(model.spec), f, indent=2)
    return path
