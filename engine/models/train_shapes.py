"""Train a small Stable Diffusion (1.x format) model from scratch, on CPU, on coloured shapes.

    python -m engine.models.train_shapes --out outputs/shapes-sd --minutes 60 --threads 2

Everything is built offline: procedural images ("a red circle and a blue square on a dark
background"), an in-memory CLIP tokenizer in which every caption word is one token, a frozen
random CLIP text encoder, then two phases of training:

  1. VAE (AutoencoderKL): L1 + MSE reconstruction and a small KL term;
  2. UNet (UNet2DConditionModel): epsilon-prediction DDPM loss on VAE latents scaled by the
     measured 1/std, with caption dropout so classifier-free guidance works.

Training mixes resolutions (--sizes 64,128) because the engine's purpose is generating above
the native size. The result is an ordinary diffusers directory that
`StableDiffusionPipeline.from_pretrained(out)` loads offline, plus out/training.json
(config, times, losses, reconstruction PSNR) and out/samples.png.

--minutes is a wall-clock budget for the two training phases (the VAE phase gets at most
--vae-fraction of it); when it runs out, training stops and the model is still saved (saving
and sampling take a few more seconds). Checkpoints go to out/checkpoints every
--checkpoint-minutes, so a killed run loses little; --resume continues from them.
Ctrl-C also stops training cleanly and saves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from engine.models.tiny_parts import bytes_to_unicode

# ---------------------------------------------------------------------------------------------
# Data: procedural scenes of 1-2 shapes. A scene is described in unit coordinates, so the same
# scene can be drawn at any resolution, and its caption is derived from the description.
# ---------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"dark": (22, 22, 30), "light": (228, 226, 216)}
# White on a light background has almost no contrast: never drawn, so never captioned.
FORBIDDEN = {("white", "light")}
JITTER = 12  # +- per channel, so the model learns colour names rather than exact values
CAPTION_WORDS = ("a", "and", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS)

# Streams keep the data of the two phases and of evaluation apart for one seed.
STREAM_VAE, STREAM_UNET, STREAM_EVAL = 0, 1, 2


def _jitter(rng: np.random.Generator, rgb) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-JITTER, JITTER + 1), 0, 255)) for c in rgb)


def random_scene(rng: np.random.Generator) -> dict:
    """A background and 1-2 non-overlapping shapes, listed left to right (caption order)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = [c for c in COLOURS if (c, background) not in FORBIDDEN]
    shapes: list[dict] = []
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(100):
            r = float(rng.uniform(0.12, 0.22))
            cx, cy = (float(v) for v in rng.uniform(r, 1 - r, size=2))
            if all(math.hypot(cx - s["cx"], cy - s["cy"]) > r + s["r"] + 0.02 for s in shapes):
                break
        else:
            break  # no room left: keep the shapes placed so far (the caption follows the drawing)
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(colours))
        while any(s["shape"] == shape and s["colour"] == colour for s in shapes):
            colour = str(rng.choice(colours))  # avoid "a red circle and a red circle"
        shapes.append({"shape": shape, "colour": colour, "rgb": _jitter(rng, COLOURS[colour]),
                       "cx": cx, "cy": cy, "r": r})
    shapes.sort(key=lambda s: s["cx"])
    return {"background": background, "bg_rgb": _jitter(rng, BACKGROUNDS[background]), "shapes": shapes}


def caption(scene: dict) -> str:
    things = " and ".join(f"a {s['colour']} {s['shape']}" for s in scene["shapes"])
    return f"{things} on a {scene['background']} background"


def draw_scene(scene: dict, size: int, supersample: int = 4) -> np.ndarray:
    """uint8 HxWx3. Drawn at `supersample` x the size then box-filtered: anti-aliased edges
    that look the same at every resolution."""
    big = size * supersample
    img = Image.new("RGB", (big, big), scene["bg_rgb"])
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        cx, cy, r = s["cx"] * big, s["cy"] * big, s["r"] * big
        if s["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=s["rgb"])
        elif s["shape"] == "square":
            h = 0.85 * r  # about the area of the circle of radius r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=s["rgb"])
        else:  # equilateral, pointing up, centroid at (cx, cy)
            dx = r * math.sqrt(3) / 2
            draw.polygon([(cx, cy - r), (cx - dx, cy + r / 2), (cx + dx, cy + r / 2)], fill=s["rgb"])
    return np.asarray(img.resize((size, size), Image.BOX))


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Sample `index` of `stream` depends only on (seed, stream, index): reproducible, and a
    resumed run sees the same data as an uninterrupted one."""
    return np.random.default_rng([seed, stream, index])


def make_dataset(n: int, size: int, seed: int = 0, stream: int = STREAM_EVAL, start: int = 0):
    """(uint8 array [n, size, size, 3], captions) for samples start..start+n-1 of a stream."""
    scenes = [random_scene(scene_rng(seed, stream, i)) for i in range(start, start + n)]
    images = np.stack([draw_scene(s, size) for s in scenes])
    return images, [caption(s) for s in scenes]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range diffusers VAEs use."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def batch_for_step(args, stream: int, step: int) -> tuple[torch.Tensor, list[str], int]:
    # Sizes take turns: each batch has one size (tensors in a batch must match).
    size = args.sizes[step % len(args.sizes)]
    images, captions = make_dataset(args.batch_size, size, args.seed, stream, start=step * args.batch_size)
    return to_tensor(images), captions, size


# ---------------------------------------------------------------------------------------------
# Tokenizer and text encoder
# ---------------------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def bpe_merges(words) -> list[tuple[str, str]]:
    """Learn BPE merges on `words` until every word is a single symbol.

    Hand-written merges per word interfere (the "r e" merge for "red" splits "green" as
    g|re|e|n); learning them the way BPE training does avoids that, because encoding applies
    merges in the order they were learned, which reproduces exactly the training-time
    segmentation of each training word. Ties are broken by the pair itself: deterministic."""
    words_symbols = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))]
    merges = []
    while True:
        counts = Counter(p for s in words_symbols for p in zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        words_symbols = [_merge_pair(s, best) for s in words_symbols]


def build_tokenizer(words=CAPTION_WORDS, max_length: int = 77):
    """A CLIPTokenizer built in memory: byte-level alphabet (so any text tokenizes) plus one
    token per caption word."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    tokens = [BOS, EOS] + chars + [c + "</w>" for c in chars]
    merges = bpe_merges(words)
    tokens += [a + b for a, b in merges if a + b not in tokens]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = max_length
    bad = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if bad:
        raise RuntimeError(f"caption words split into several tokens: {bad}")
    return tokenizer


def build_text_encoder(vocab_size: int, seed: int, hidden: int = 64, layers: int = 2):
    """A small CLIP text encoder with seeded random weights. It stays frozen: random
    features separate the few caption words well enough, and the UNet learns to read them."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.eval().requires_grad_(False)


class TextEmbedder:
    """Prompt embeddings exactly as StableDiffusionPipeline computes them (padded to
    max_length, no attention mask, last hidden state), cached: there are few captions."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.cache = tokenizer, text_encoder, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            for c, e in zip(missing, self.text_encoder(ids)[0]):
                self.cache[c] = e
        return torch.stack([self.cache[c] for c in captions])


# ---------------------------------------------------------------------------------------------
# Models and schedulers
# ---------------------------------------------------------------------------------------------

def build_vae(factor: int = 8):
    from diffusers import AutoencoderKL

    # Each block after the first halves the resolution: 4 blocks = factor 8, 3 = factor 4.
    channels = {8: (16, 32, 64, 64), 4: (16, 32, 64)}[factor]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=128,
    )


def build_unet(cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=cross_attention_dim, norm_num_groups=8,
    )


# SD 1.x noise schedule; training and sampling must use the same betas.
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(**BETAS, clip_sample=False)
    sample = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return train, sample


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary name then renamed, so a kill never leaves a torn file.
# ---------------------------------------------------------------------------------------------

def _ckpt_path(args, name: str) -> str:
    return os.path.join(args.out, "checkpoints", f"{name}.pt")


def save_checkpoint(args, name: str, state: dict) -> None:
    path = _ckpt_path(args, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(args, name: str) -> dict | None:
    path = _ckpt_path(args, name)
    if not (args.resume and os.path.isfile(path)):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------------------------

def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup))  # linear warm-up, then constant


def run_loop(name: str, step: int, total: int, deadline: float, step_fn, checkpoint_fn, args,
             smoothed: float | None = None) -> dict:
    """Call step_fn(step) -> loss until `total` steps, the deadline or Ctrl-C; checkpoint
    every --checkpoint-minutes. Returns the step reached, a smoothed loss (continuing
    `smoothed`, a resumed run's last one) and why it stopped."""
    from tqdm import tqdm

    stopped, first = "steps", step
    last_ckpt = time.monotonic()
    bar = tqdm(total=total, initial=step, desc=name, dynamic_ncols=True, mininterval=1.0)
    try:
        while step < total:
            if time.monotonic() >= deadline:
                stopped = "time budget"
                break
            loss = step_fn(step)
            step += 1
            # An exponential average: one batch's loss is noisy (random sizes and timesteps).
            smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
            if time.monotonic() - last_ckpt >= args.checkpoint_minutes * 60:
                checkpoint_fn(step, smoothed)
                bar.write(f"{name}: checkpoint at step {step}, loss {smoothed:.4f}")
                last_ckpt = time.monotonic()
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
    if step > first:  # nothing new to save otherwise (and the saved loss stays)
        checkpoint_fn(step, smoothed)
    return {"step": step, "loss": smoothed, "stopped": stopped}


def train_vae(vae, args, deadline: float) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = load_checkpoint(args, "vae")
    start = 0
    if ckpt:
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    vae.train()

    def step_fn(step: int) -> float:
        x, _, _ = batch_for_step(args, STREAM_VAE, step)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.vae_lr, args.warmup)
        with _autocast(args.vae_bf16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        # L1 keeps the edges sharp, MSE is what PSNR measures; the KL only keeps latents tame.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl_weight * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    def checkpoint_fn(step: int, loss) -> None:
        save_checkpoint(args, "vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "loss": loss})

    result = run_loop("vae", start, args.vae_steps, deadline, step_fn, checkpoint_fn, args,
                      ckpt["loss"] if ckpt else None)
    if not os.path.isfile(_ckpt_path(args, "vae")):
        checkpoint_fn(result["step"], result["loss"])  # a resumed UNet needs this very VAE
    vae.eval()
    return result


@torch.no_grad()
def encode(vae, x: torch.Tensor, bf16: bool, generator=None) -> torch.Tensor:
    with _autocast(bf16):
        dist = vae.encode(x).latent_dist
    return (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)).float()


@torch.no_grad()
def measure_scaling_factor(vae, args) -> float:
    """1 / std of the latents, as SD's 0.18215 was measured: unit-variance latents match
    the noise the scheduler adds."""
    latents = []
    for size in args.sizes:
        images, _ = make_dataset(args.eval_images, size, args.seed, STREAM_EVAL)
        latents.append(encode(vae, to_tensor(images), args.vae_bf16, torch.Generator().manual_seed(args.seed)).flatten())
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def reconstruction_psnr(vae, args) -> dict[str, float]:
    """PSNR (dB, images in [0, 1]) of decode(mode of encode(x)) on held-out images, in fp32."""
    out = {}
    for size in args.sizes:
        images, _ = make_dataset(args.eval_images, size, args.seed, STREAM_EVAL)
        x = to_tensor(images)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
        out[str(size)] = 10 * math.log10(1.0 / max(mse, 1e-12))
    return out


class EMA:
    """Exponential moving average of the UNet weights: much better samples from a short,
    noisy training run. Decay warms up so early weights are forgotten quickly."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, model) -> None:
        for ema, p in zip(self.params, model.parameters()):
            p.copy_(ema)


def train_unet(unet, vae, embed: TextEmbedder, noise_scheduler, scaling: float, args, deadline: float) -> dict:
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(unet, args.ema)
    ckpt = load_checkpoint(args, "unet")
    start = 0
    if ckpt:
        unet.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        ema.params = [t.clone() for t in ckpt["ema"]]
        start = ckpt["step"]
    unet.train()
    alphas = noise_scheduler.alphas_cumprod

    def step_fn(step: int) -> float:
        x, captions, _ = batch_for_step(args, STREAM_UNET, step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        latents = encode(vae, x, args.vae_bf16, gen) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(x),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        # Caption dropout: "" is exactly what the pipeline encodes for the unconditional half
        # of classifier-free guidance.
        drop = torch.rand(len(x), generator=gen) < args.caption_dropout
        cond = embed(["" if d else c for c, d in zip(captions, drop.tolist())])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.lr, args.warmup)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet, step)
        return loss.item()

    def checkpoint_fn(step: int, loss) -> None:
        save_checkpoint(args, "unet", {"model": unet.state_dict(), "opt": opt.state_dict(), "ema": ema.params,
                                       "step": step, "loss": loss, "scaling_factor": scaling})

    result = run_loop("unet", start, args.unet_steps, deadline, step_fn, checkpoint_fn, args,
                      ckpt["loss"] if ckpt else None)
    ema.copy_to(unet)  # the saved pipeline gets the averaged weights
    unet.eval()
    return result


# ---------------------------------------------------------------------------------------------
# Saving and sampling
# ---------------------------------------------------------------------------------------------

SAMPLE_PROMPTS = (
    "a red circle on a dark background",
    "a blue square on a light background",
    "a green triangle and a yellow circle on a dark background",
    "a purple square and a red triangle on a light background",
    "a white circle and a blue triangle on a dark background",
    "a yellow square on a light background",
)


def save_pipeline(args, vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    return pipe


@torch.no_grad()
def sample_grid(args) -> str:
    """Generate SAMPLE_PROMPTS with the pipeline as saved (reloaded from disk), fixed seed."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.out)
    pipe.set_progress_bar_config(disable=True)
    size = args.sample_size or max(args.sizes)
    images = pipe(list(SAMPLE_PROMPTS), height=size, width=size, num_inference_steps=args.sample_steps,
                  guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed)).images
    grid = Image.new("RGB", (size * len(images), size))
    for i, img in enumerate(images):
        grid.paste(img, (i * size, 0))
    path = os.path.join(args.out, "samples.png")
    grid.save(path)
    return path


def _weights_mb(out: str) -> float:
    total = 0
    for root, _, files in os.walk(out):
        if "checkpoints" not in root:
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".safetensors"))
    return total / 1e6


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def train(args) -> dict:
    """Both training phases, save, sample; returns what training.json holds."""
    t0 = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    deadline = t0 + args.minutes * 60 if args.minutes else math.inf

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), args.seed, hidden=args.text_hidden)
    # The text encoder is never trained, but a resume must use the very same one.
    te_ckpt = load_checkpoint(args, "text_encoder")
    if te_ckpt:
        text_encoder.load_state_dict(te_ckpt["model"])
    else:
        save_checkpoint(args, "text_encoder", {"model": text_encoder.state_dict()})
    torch.manual_seed(args.seed)
    vae = build_vae(args.vae_factor)
    unet = build_unet(text_encoder.config.hidden_size, max(args.sizes) // args.vae_factor)
    noise_scheduler, sample_scheduler = build_schedulers()

    # Once the UNet has started, the VAE is fixed: retraining it would move the latents
    # the UNet learned.
    unet_ckpt = load_checkpoint(args, "unet")
    if unet_ckpt:
        vae_ckpt = load_checkpoint(args, "vae")
        vae.load_state_dict(vae_ckpt["model"])
        vae_result = {"step": vae_ckpt["step"], "loss": vae_ckpt["loss"], "stopped": "unet already started"}
        scaling = unet_ckpt["scaling_factor"]
    else:
        # Measured from now, not from t0: imports and setup must not eat the VAE's share.
        now = time.monotonic()
        vae_deadline = deadline if math.isinf(deadline) else now + args.vae_fraction * max(0.0, deadline - now)
        vae_result = train_vae(vae, args, vae_deadline)
        scaling = measure_scaling_factor(vae, args)
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=scaling)
    psnr = reconstruction_psnr(vae, args)
    print(f"vae: reconstruction PSNR {psnr} dB, latent scaling factor {scaling:.4f}", flush=True)

    if vae_result["stopped"] == "interrupted":
        unet_result = {"step": unet_ckpt["step"] if unet_ckpt else 0, "loss": None, "stopped": "interrupted"}
    else:
        embed = TextEmbedder(tokenizer, text_encoder)
        unet_result = train_unet(unet, vae, embed, noise_scheduler, scaling, args, deadline)
    train_s = time.monotonic() - t0

    save_pipeline(args, vae, text_encoder, tokenizer, unet, sample_scheduler)
    samples = sample_grid(args)
    report = {
        "config": dict(vars(args)),
        "vae": {**vae_result, "psnr_db": psnr, "scaling_factor": scaling,
                "params": sum(p.numel() for p in vae.parameters())},
        "unet": {**unet_result, "params": sum(p.numel() for p in unet.parameters())},
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
        "weights_mb": _weights_mb(args.out),
        "train_wall_s": train_s,
        "total_wall_s": time.monotonic() - t0,
        "samples": {"path": samples, "prompts": list(SAMPLE_PROMPTS), "seed": args.seed},
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"saved {args.out} ({report['weights_mb']:.1f} MB of weights) in {report['total_wall_s']:.0f} s; "
          f"unet loss {unet_result['loss']}, stopped by {unet_result['stopped']}", flush=True)
    return report


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory: pipeline, training.json, samples.png, checkpoints/")
    p.add_argument("--seed", type=int, default=0, help="data, init and sampling seed (default 0)")
    p.add_argument("--vae-steps", type=int, default=3000, help="VAE training steps (default 3000)")
    p.add_argument("--unet-steps", type=int, default=100000,
                   help="UNet training steps (default 100000: in practice --minutes ends it)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--lr", type=float, default=5e-4, help="UNet AdamW learning rate (default 5e-4)")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="VAE AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps, both phases (default 200)")
    p.add_argument("--sizes", type=_int_list, default=[64, 128],
                   help="training resolutions, comma separated, used in turn (default 64,128)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="wall-clock budget of this run for training, then stop and save (default 0 = no limit)")
    p.add_argument("--vae-fraction", type=float, default=0.25,
                   help="at most this share of --minutes goes to the VAE (default 0.25)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out/checkpoints")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = torch's default)")
    p.add_argument("--vae-factor", type=int, choices=(4, 8), default=8, help="VAE downsampling factor (default 8)")
    p.add_argument("--vae-bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for the VAE, faster on CPUs with bf16 support (default on)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="VAE KL weight (default 1e-6)")
    p.add_argument("--text-hidden", type=int, default=64, help="text encoder width = UNet cross-attention dim (default 64)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="share of empty captions, for classifier-free guidance (default 0.1)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved UNet weights (default 0.999)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="checkpoint interval (default 5)")
    p.add_argument("--eval-images", type=int, default=32,
                   help="held-out images per size for PSNR and the latent scale (default 32)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps for samples.png (default 25)")
    p.add_argument("--sample-size", type=int, default=0, help="samples.png image size (default 0 = largest of --sizes)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale for samples.png (default 5)")
    args = p.parse_args(argv)
    align = args.vae_factor * 4  # the UNet halves the latent twice
    if not args.sizes or any(s % align for s in args.sizes):
        p.error(f"--sizes must be multiples of {align} with --vae-factor {args.vae_factor}")
    return args


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
