"""ASG's plan, guidance schedule and structure mask (see parallel/asg/__init__.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.asg.tiles import TileGrid
from parallel.config import ConfigError

# Pipelines with spatial latents whose denoiser attends from image to text (the mask's
# source): UNets and PixArt by cross-attention, SD3 by joint attention. Flux packs its
# latents into tokens before the denoiser: there is no spatial tile to cut.
ASG_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtSigmaPipeline", "PixArtAlphaPipeline",
                 "StableDiffusion3Pipeline")


def asg_plan(info, parallel, height: int, width: int, steps: int) -> tuple[TileGrid, int]:
    """(tile grid, detail steps) of an ASG request; raises ConfigError on bad input."""
    if info.pipeline not in ASG_PIPELINES:
        why = " (it packs the latent into tokens: no spatial tile to cut)" if info.pipeline == "FluxPipeline" else ""
        raise ConfigError(f"strategy 'asg' supports {', '.join(ASG_PIPELINES)}; {info.name} is a {info.pipeline}{why}")
    vae = info.vae_scale_factor
    tile = info.native_size // vae
    overlap = parallel.asg_tile_overlap if parallel.asg_tile_overlap is not None else tile // 4
    grid = TileGrid.cover(height // vae, width // vae, tile, tile, overlap)
    world = parallel.world_size or 1
    if world > 1:
        if parallel.cfg_split:
            raise ConfigError("asg spreads tiles over the ranks; cfg_split does not apply to it")
        grid.assign(world - 1)  # ranks 0..N-2 take tiles, rank N-1 the branch: enough tiles?
    detail = parallel.asg_detail_steps if parallel.asg_detail_steps is not None else steps // 4
    if detail > steps:
        raise ConfigError(f"asg_detail_steps {detail} exceeds the {steps} denoising steps")
    return grid, detail


def guidance_weight(step: int, steps: int, strength: float, detail_steps: int) -> float:
    """w at denoising step `step` (0 = noisiest) of `steps`."""
    guided = steps - detail_steps
    if step >= guided or guided <= 0:
        return 0.0
    return strength * 0.5 * (1.0 + math.cos(math.pi * step / guided))


def denoiser_calls(scheduler, steps: int) -> int:
    """How often the pipeline calls the denoiser for `steps` steps: once per timestep the
    scheduler lays out (Heun and KDPM2 evaluate twice per step but the last: 2 * steps - 1)."""
    order = getattr(scheduler, "order", 1)
    probe = type(scheduler).from_config(scheduler.config)
    try:
        probe.set_timesteps(steps)
    except (TypeError, ValueError):  # e.g. flow matching with dynamic shifting wants `mu`
        return order * (steps - 1) + 1
    return len(probe.timesteps)


@dataclass(frozen=True)
class GuidanceSchedule:
    """When and how strongly one request is guided, counted in denoiser calls."""

    calls: int  # denoiser calls of the request (steps, or about twice that for Heun)
    strength: float  # w at the first call
    detail_calls: int  # the last calls, without guidance
    mask_floor: float  # M = floor + (1 - floor) * normalised attention mass

    @classmethod
    def for_request(cls, scheduler, steps: int, strength: float, detail_steps: int, mask_floor: float):
        """The last `detail_steps` steps in calls: every step but the last takes `order`
        calls, so the guided steps are the first `order * (steps - detail_steps)` calls and a
        step is never guided on one of its calls only."""
        return cls.for_calls(denoiser_calls(scheduler, steps), getattr(scheduler, "order", 1), strength, detail_steps,
                             mask_floor)

    @classmethod
    def for_calls(cls, calls: int, order: int, strength: float, detail_steps: int, mask_floor: float):
        """The same for a request whose pipeline makes `calls` denoiser calls (img2img, a
        refiner's part: fewer than its steps), i.e. ceil(calls / order) steps."""
        steps = -(-calls // order)
        guided = order * (steps - detail_steps)
        return cls(calls, strength, max(0, calls - guided), mask_floor)

    def weight(self, call: int) -> float:
        return guidance_weight(call, self.calls, self.strength, self.detail_calls) if call < self.calls else 0.0


class AttentionMassRecorder:
    """While `recording` (the branch's call), keeps per layer each image location's
    attention mass on the prompt's own tokens, averaged over heads: (B, L) into `maps`.
    From cross-attention (UNets, PixArt: image queries over text keys) or from the
    image-to-text part of joint attention (SD3: image queries over [image; text] keys).
    It only measures; the layer's output still comes from the model's own processor."""

    def __init__(self, maps: list, token_spans: list, skip: int = 0):
        self.maps = maps
        self.token_spans = token_spans  # per measured batch element: [(first, end), ...] in the text sequence
        self.skip = skip  # leading batch elements not measured (CFG: the unconditional half)
        self.recording = False

    @torch.no_grad()
    def record(self, attn, hidden_states, encoder_hidden_states, attention_mask, joint: bool) -> None:
        skip = self.skip
        hidden_states, encoder_hidden_states = hidden_states[skip:], encoder_hidden_states[skip:]
        if attention_mask is not None:
            attention_mask = attention_mask[skip:]
        batch, length, _ = hidden_states.shape
        heads = attn.heads

        def split(t):  # (B, n, heads * dim) -> (B, heads, n, dim)
            return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        query = split(attn.to_q(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        bias, offset = None, 0
        if joint:  # keys [image; text]: the text tokens start after the image's
            key_image, key_text = split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
            if attn.norm_k is not None:
                key_image = attn.norm_k(key_image)
            if attn.norm_added_k is not None:
                key_text = attn.norm_added_k(key_text)
            key, offset = torch.cat([key_image, key_text], dim=2), length
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = split(attn.to_k(encoder_hidden_states))
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if attention_mask is not None:  # PixArt: an additive bias that hides padding tokens
                bias = attn.prepare_attention_mask(attention_mask, key.shape[-2], batch).view(batch, heads, -1, key.shape[-2])
        mass = torch.zeros(batch, length, dtype=torch.float32, device=hidden_states.device)
        for h in range(heads):  # one head at a time: joint scores are (L, L + T) per head
            scores = (query[:, h].float() @ key[:, h].float().transpose(-1, -2)) * attn.scale
            if bias is not None:
                scores = scores + bias[:, h].float()
            probs = torch.softmax(scores, dim=-1)
            for b, spans in enumerate(self.token_spans):
                for first, end in spans:
                    mass[b] += probs[b, :, offset + first:offset + end].sum(-1)
        self.maps.append(mass / heads)


class RecordingOrOriginal:
    """One text-attending layer's processor during an ASG request: the model's own processor
    (SDPA, xformers, a patch-parallel one, ...), measured by the recorder on the branch's call."""

    def __init__(self, original, recorder: AttentionMassRecorder, joint: bool):
        self.original, self.recorder, self.joint = original, recorder, joint

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if self.recorder.recording and encoder_hidden_states is not None:
            # with an IP-Adapter diffusers passes (text, image tokens): the layout is the text's
            text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            self.recorder.record(attn, hidden_states, text, attention_mask, self.joint)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def text_attention_layers(denoiser) -> dict[str, bool]:
    """Processor name -> joint? for the layers whose image queries attend to text: the
    cross-attention layers (UNet, PixArt) or the joint attention layers (SD3)."""
    layers = {}
    for name in getattr(denoiser, "attn_processors", {}):
        module = denoiser.get_submodule(name.rsplit(".processor", 1)[0])
        if getattr(module, "is_cross_attention", False):
            layers[name] = False
        elif getattr(module, "add_k_proj", None) is not None:
            layers[name] = True
    return layers


def _span(tokenizer, prompt: str, offset: int = 0) -> tuple[int, int]:
    """(first, end) of the prompt's own tokens: after the start token (CLIP has one, T5 not),
    before the end token and padding."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    first = 1 if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else 0
    end = len(ids) - 1 if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id else len(ids)
    return offset + first, offset + max(first + 1, end)


def prompt_token_spans(pipe, prompts: list[str]) -> list[list[tuple[int, int]]]:
    """Per prompt, where its own tokens sit in the text sequence the denoiser attends to.
    SD3's sequence is [CLIP (padded to the tokenizer's length); T5]: one span in each (the
    T5 part only when there is a T5 encoder; without one it is zeros)."""
    spans = []
    for prompt in prompts:
        mine = [_span(pipe.tokenizer, prompt)]
        if getattr(pipe, "text_encoder_3", None) is not None:
            mine.append(_span(pipe.tokenizer_3, prompt, offset=pipe.tokenizer_max_length))
        spans.append(mine)
    return spans


def structure_mask(maps: list[torch.Tensor], native: tuple[int, int]) -> torch.Tensor:
    """(B, 1, rows, columns) in [0, 1] at the `native` latent size the branch ran at, from
    its per-layer (B, L) attention masses. Kept at native size: that is what travels to the
    tile ranks (a quarter of the high-resolution size at 2x), upsampled where applied."""
    total = None
    for m in maps:
        batch, length = m.shape
        # every UNet level keeps the native aspect ratio: rows = sqrt(L * rows / columns)
        rows = round(math.sqrt(length * native[0] / native[1]))
        grid = m.view(batch, 1, rows, length // rows)
        if grid.shape[-2:] != native:
            grid = F.interpolate(grid, size=native, mode="bilinear", align_corners=False)
        total = grid if total is None else total + grid
    total = total / len(maps)
    low = total.amin(dim=(2, 3), keepdim=True)
    high = total.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (total - low) / span.clamp_min(1e-12), torch.ones_like(total))
