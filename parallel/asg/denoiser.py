"""ASG's tiled denoiser: single-process reference and multi-rank (see parallel/asg/__init__.py)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from comms.asg_channel import BranchChannel, StripExchange, assemble_latents
from parallel.asg.control import controlnet_deferred, deferred, instance_forward, without_control
from parallel.asg.guidance import (AttentionMassRecorder, GuidanceSchedule, RecordingOrOriginal, prompt_token_spans,
                                   structure_mask, text_attention_layers)
from parallel.asg.tiles import TileGrid, TilePlan

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

    def whole(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole current latent, for a preview (single process: already whole)."""
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
        control = deferred(kwargs)
        if control is not None:  # the ControlNet on the same view (outside the recording: the mask is the UNet's)
            kwargs = {**without_control(kwargs), **control.on_view(view)}
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
        control = deferred(kwargs)
        plain = without_control(kwargs)
        for tile in tiles:
            ys, xs = self.grid.window(tile)
            window = sample[..., ys, xs].contiguous()
            extra = control.on_window(window, ys, xs) if control is not None else {}  # the tile's own residuals
            total[..., ys, xs] += self.forward(window, *args, **plain, **extra)[0]
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
                     topo=None, stats=None, staleness: int = 1, controlnet=None):
    """Run the pipeline's denoiser as ASG for one request, then restore it. With `topo`
    (several ranks) the tiles and the branch are spread over the ranks. `controlnet`: the
    request's ControlNet (or MultiControlNetModel), run per tile and on the branch's view."""
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
    with instance_forward(denoiser, wrapper):
        try:
            with controlnet_deferred(controlnet):
                yield wrapper
        finally:
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
        # where this rank's latent counts, on the device once (a boolean index of it would sync)
        self._owned = None if self.is_branch else self.plan.owned(self.plan.index).to(device)
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
        return self.whole(latents)

    def whole(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole latent on every rank, from each tile rank's own positions: a collective
        of every rank (a preview's, at the same step on each)."""
        if latents.ndim != 4:
            raise RuntimeError(f"asg expects spatial latents (B, C, H, W), got {tuple(latents.shape)}")
        return assemble_latents(latents, self._owned, self.stats)

    def owned(self) -> torch.Tensor | None:
        """(H, W) bool on the device: the latent positions whose final value this rank gives
        (None: the branch)."""
        return self._owned
