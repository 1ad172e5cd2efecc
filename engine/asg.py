"""Asynchronous structure guidance (ASG): high-resolution generation beyond the native size.

After ASGDiffusion (Li et al., "ASGDiffusion: Parallel High-Resolution Generation with
Asynchronous Structure Guidance", 2024). The high-resolution (HR) latent is covered by
native-size tiles with overlap (`parallel.asg_tiles.TileGrid`); every denoiser call

1. (on guided steps, w > 0) runs a *structure branch*: the same denoiser on a global view of the HR latent at native
   size (nearest-neighbour subsampling, which keeps the per-pixel noise level that area
   averaging would shrink). Its noise prediction, upsampled to HR, is the guidance `G`; the
   branch's attention probabilities from image locations to the prompt's own tokens
   (cross-attention, or joint attention's image-to-text part; not the start token,
   not padding), averaged over heads and layers at native size, min-max normalised per
   image and lifted by a floor (`M = floor + (1 - floor) * map`), are the mask `M` in
   [0, 1] (strongest where the layout is decided by the prompt), upsampled where applied;
2. denoises every tile at native size and averages the tiles where they overlap
   (MultiDiffusion: sum / coverage count), giving `eps`;
3. guides it: `eps <- eps + w(t) * M * up(G - down(eps))`, where `down` picks the same latent
   pixels the branch saw and `up` is bilinear. This is ASGDiffusion's
   `eps_i + w M_i (G_i - eps_i)` with the difference taken on the branch's grid: both
   predictions there are of the same noisy pixels, so their difference is structure, not
   noise. Pulling eps towards a smooth upsampled G itself (measured on shapes-sd at 2x)
   erases the per-pixel noise prediction and leaves noise in the image. Averaging before
   guiding is the same as guiding each tile and averaging (the guidance is linear and
   global).

`w(t)` (`guidance_weight`): `strength * (1 + cos(pi * k / K)) / 2` at step k < K =
steps - detail_steps, strong at high noise, falling to zero; zero in the last
`detail_steps` steps, where tiles refine detail on their own. The schedule counts denoiser
calls (`GuidanceSchedule`): a second-order scheduler such as Heun calls the denoiser
twice per step but the last, the cosine runs over the calls, and the detail steps stay
whole steps. With CFG the same `w * M` applies to both halves, so by linearity the guided
prediction is guided by the branch's guided prediction.

This module is the single-process reference of the algorithm (one rank computes all tiles
and the branch). It wraps the denoiser's forward for one request, so the unmodified
diffusers pipeline and any elementwise scheduler run at the HR size.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comms.asg_channel import BranchChannel, StripExchange, assemble_latents
from parallel.asg_tiles import TileGrid, TilePlan
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
        calls = denoiser_calls(scheduler, steps)
        guided = getattr(scheduler, "order", 1) * (steps - detail_steps)
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
            self.recorder.record(attn, hidden_states, encoder_hidden_states, attention_mask, self.joint)
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


class StructureGuidedTiles:
    """The denoiser forward of one ASG request (single process: all tiles and the branch)."""

    def __init__(self, denoiser, grid: TileGrid, schedule: GuidanceSchedule, token_spans: list, cfg: bool):
        self.denoiser = denoiser
        self.forward = denoiser.forward  # the original bound forward
        self.grid = grid
        self.schedule = schedule
        self.cfg = cfg
        self.maps: list = []
        # with CFG the batch is [uncond; cond]: only the conditional half's layout is measured
        self.recorder = AttentionMassRecorder(self.maps, token_spans, skip=len(token_spans) if cfg else 0)
        self.step = 0
        self.branch_calls = 0
        self.weights = None
        # the prediction's channels: twice the latent's where the model also predicts variance (PixArt)
        self.out_channels = denoiser.config.out_channels

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The final latent (single process: already whole)."""
        return latents

    def _branch(self, sample, args, kwargs):
        """(G, M): the branch's prediction on the subsampled global view and the structure
        mask, both at native size."""
        native = (self.grid.tile_h, self.grid.tile_w)
        return self._branch_on(F.interpolate(sample, size=native, mode="nearest"), args, kwargs)

    def _branch_on(self, view, args, kwargs):
        """(G, M) from the global view at native size. With CFG the mask is the conditional
        half's only: it guides both halves (linearity of CFG)."""
        self.branch_calls += 1
        native = tuple(view.shape[-2:])
        self.maps.clear()
        self.recorder.recording = True
        try:
            guide = self.forward(view, *args, **kwargs)[0]
        finally:
            self.recorder.recording = False
        mask = structure_mask(self.maps, native)
        floor = self.schedule.mask_floor
        if floor > 0:  # guide the background too, where tiles would otherwise repeat objects
            mask = floor + (1.0 - floor) * mask
        return guide, mask.to(view.dtype)

    def _guide(self, eps, guide, mask, w: float, down_eps=None):
        """eps + w * M * up(G - eps on the branch's pixels). The difference is taken where the
        branch and the tiles predict the noise of the same latent pixels, so it carries only
        their disagreement about structure, and is upsampled smoothly; pulling eps towards
        a smooth upsampled G itself would wipe out the per-pixel noise prediction. With stale
        guidance (a step old) G predicts the previous step's pixels: an approximation."""
        if down_eps is None:  # eps on the branch's pixels (given when eps is valid on a region only)
            down_eps = F.interpolate(eps, size=guide.shape[-2:], mode="nearest")
        size = eps.shape[-2:]
        up = F.interpolate((guide - down_eps).float(), size=size, mode="bilinear", align_corners=False)
        mask = F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False)
        mask = mask.repeat(eps.shape[0] // mask.shape[0], 1, 1, 1)  # CFG: the conditional mask for both halves
        return eps + (w * mask * up).to(eps.dtype)

    def _sum_tiles(self, sample, tiles, args, kwargs) -> torch.Tensor:
        """The sum of `tiles`' predictions, each in its window of a zero latent."""
        total = sample.new_zeros(sample.shape[0], self.out_channels, *sample.shape[2:])
        for tile in tiles:
            ys, xs = self.grid.window(tile)
            total[..., ys, xs] += self.forward(sample[..., ys, xs].contiguous(), *args, **kwargs)[0]
        return total

    @staticmethod
    def _output(out, return_dict: bool):
        """What the denoiser's forward returns (pipelines call with return_dict=False)."""
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    @staticmethod
    def _sample(args: tuple, kwargs: dict):
        """(the latent, the other positional arguments): pipelines pass the latent first, or
        as `hidden_states=` (SD3); the tiles pass it first."""
        if "hidden_states" in kwargs:
            return kwargs.pop("hidden_states"), args
        return args[0], args[1:]

    def __call__(self, *args, return_dict=True, **kwargs):
        sample, args = self._sample(args, kwargs)
        w = self.schedule.weight(self.step)
        self.step += 1
        if self.weights is None:
            self.weights = self.grid.weights(sample.device, sample.dtype)
        kwargs["return_dict"] = False
        guide = mask = None
        if w > 0:
            guide, mask = self._branch(sample, args, kwargs)
        out = self._sum_tiles(sample, self.grid.tiles, args, kwargs) / self.weights
        if w > 0:
            out = self._guide(out, guide, mask, w)
        return self._output(out, return_dict)


@contextmanager
def structure_guided(pipe, denoiser, grid: TileGrid, schedule: GuidanceSchedule, prompts: list[str], cfg: bool,
                     topo=None, stats=None, staleness: int = 1):
    """Run the pipeline's denoiser as ASG for one request, then restore it. With `topo`
    (several ranks) the tiles and the branch are spread over the ranks."""
    layers = text_attention_layers(denoiser)
    if not layers:
        raise NotImplementedError(f"asg needs a denoiser whose image attends to text (UNet, PixArt, SD3); "
                                  f"got {type(denoiser).__name__}")
    common = (denoiser, grid, schedule, prompt_token_spans(pipe, prompts), cfg)
    if topo is not None and topo.distributed:
        wrapper = ParallelStructureGuidedTiles(
            *common, strips_group=topo.world, branch_group=topo.side_group(), stats=stats, rank=topo.rank,
            world=topo.world_size, staleness=staleness)
    else:
        wrapper = StructureGuidedTiles(*common)
    saved = dict(denoiser.attn_processors)
    denoiser.set_attn_processor({name: RecordingOrOriginal(proc, wrapper.recorder, layers[name]) if name in layers else proc
                                 for name, proc in saved.items()})
    denoiser.forward = wrapper
    try:
        yield wrapper
    finally:
        del denoiser.forward  # back to the class's forward
        denoiser.set_attn_processor(saved)


class ParallelStructureGuidedTiles(StructureGuidedTiles):
    """ASG over ranks: ranks 0..N-2 denoise their share of the tiles, rank N-1 runs the
    structure branch.

    A tile rank's latent is valid on its own region (the union of its tiles) only: the
    pipeline and the elementwise scheduler run over the whole latent everywhere, but only
    the region is ever read. Per step a tile rank (1) sends the branch the view pixels it
    owns, (2) denoises its tiles, (3) swaps overlap strips with the tile ranks it shares
    positions with (`comms.asg_channel.StripExchange`), completing the average on its
    region, and (4) applies the guidance computed at step k - staleness (step 0 always
    its own). The branch rank assembles the global view from the view pixels, runs the
    branch and broadcasts the guidance asynchronously; with staleness 1 that runs beside
    the tiles' next step instead of before it. After the last step `finish` assembles the
    whole latent. With staleness 0 the result equals the single-process reference up to
    float reassociation of the sums."""

    def __init__(self, *args, strips_group, branch_group, stats, rank: int, world: int, staleness: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats = stats
        self.is_branch = rank == world - 1
        tile_ranks = world - 1
        self.plan = TilePlan.build(self.grid, tile_ranks, min(rank, tile_ranks - 1))
        self.my_tiles = [] if self.is_branch else self.grid.assign(tile_ranks)[rank]
        device = self.denoiser.device
        self.strips = None if self.is_branch else StripExchange(**self.plan.strip_indices(device), stats=stats,
                                                                 group=strips_group)
        self.channel = BranchChannel(**self.plan.branch_indices(device), stats=stats, group=branch_group)
        self.staleness = staleness
        self.posted: dict = {}  # step -> broadcast in flight
        self.ready: dict = {}  # step -> (G, M) received
        self.guidance_wait_s: list[float] = []  # per step

    def _source(self, k: int) -> int:
        """The step whose guidance step k applies."""
        return k if self.staleness == 0 or k == 0 else k - 1

    def _computed(self, j: int) -> bool:
        """Whether the guidance of step j is used by any guided step."""
        users = [j] if self.staleness == 0 else ([0, 1] if j == 0 else [j + 1])
        return any(self.schedule.weight(k) > 0 for k in users)

    def _shapes(self, sample):
        batch = sample.shape[0]
        return [(batch, self.out_channels, self.grid.tile_h, self.grid.tile_w),
                (batch // 2 if self.cfg else batch, 1, self.grid.tile_h, self.grid.tile_w)]

    def __call__(self, *args, return_dict=True, **kwargs):
        sample, args = self._sample(args, kwargs)
        k = self.step
        self.step += 1
        self.stats.step = k
        kwargs["return_dict"] = False
        if self.is_branch:
            out = self._branch_step(k, sample, args, kwargs)
        else:
            out = self._tile_step(k, sample, args, kwargs)
        return self._output(out, return_dict)

    def _branch_step(self, k: int, sample, args, kwargs) -> torch.Tensor:
        """Run the branch on the assembled view when a tile step will use it. The branch's
        own latent is never read, so its prediction is zeros."""
        if self._computed(k):
            native = (self.grid.tile_h, self.grid.tile_w)
            view = self.channel.gather_view(sample, native)
            guide, mask = self._branch_on(view, args, kwargs)
            packed = torch.cat([guide.flatten(), mask.flatten()]).to(sample.dtype)  # what tile ranks allocate
            self.channel.post(0, sample.dtype, sample.device, packed)
        self.guidance_wait_s.append(0.0)
        return sample.new_zeros(sample.shape[0], self.out_channels, *sample.shape[2:])

    def _tile_step(self, k: int, sample, args, kwargs) -> torch.Tensor:
        w = self.schedule.weight(k)
        shapes = self._shapes(sample)
        if self._computed(k):  # view out and guidance posted before the tiles: both travel meanwhile
            self.channel.send_view(sample)
            self.posted[k] = self.channel.post(sum(math.prod(s) for s in shapes), sample.dtype, sample.device)
        if self.weights is None:
            self.weights = self.grid.weights(sample.device, sample.dtype)
        partial, down = self.strips.complete(self._sum_tiles(sample, self.my_tiles, args, kwargs), with_view=w > 0)
        out = partial / self.weights
        waited = 0.0
        if w > 0:
            j = self._source(k)
            if j not in self.ready:
                flat, waited = self.channel.wait(self.posted.pop(j))
                split = math.prod(shapes[0])
                self.ready = {j: (flat[:split].view(shapes[0]), flat[split:].view(shapes[1]))}
            guide, mask = self.ready[j]
            down_eps = (down / self.weights.flatten()[self.strips.view]).view(shapes[0])
            out = self._guide(out, guide, mask, w, down_eps)
        self.guidance_wait_s.append(waited)
        return out

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole final latent on every rank, from each tile rank's own positions."""
        self.channel.finish()
        if latents.ndim != 4:
            raise RuntimeError(f"asg expects spatial latents (B, C, H, W), got {tuple(latents.shape)}")
        owned = None if self.is_branch else self.plan.owned(self.plan.index).to(latents.device)
        return assemble_latents(latents, owned, self.stats)
