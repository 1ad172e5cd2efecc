"""RankRuntime: one rank's model, parallel layers and the generate loop.

The same object runs under every launcher: in the caller's process (serial, or one rank
of a torchrun job) and in each worker process of the local launcher.
"""

from __future__ import annotations

import resource
from contextlib import nullcontext
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from comms import CommStats, Topology
from comms.groups import differing_in_store, store_barrier
from comms import wire_check
from comms.collectives import all_gather_object, check_same_weights
from parallel.asg import GuidanceSchedule, asg_plan, structure_guided
from parallel.asg.rescale import rescaled_over_ranks
from engine.runtime.decode import decode_latents, decode_latents_parallel
from engine import host_sync
from engine.faults import FAULT_ENV, injected_delay, injected_fault_step
from engine.metrics import compare
from engine.latents import spatial_latents
from engine.models import denoiser_of, info_from_pipeline, load_pipeline, pipeline_call_kwargs, resolve_scheduler
from engine.requests import GenerateRequest, request_digests
from engine.runtime.addons import AddOns
from engine.workflows import call_kwargs, denoiser_calls_run, pipeline_for
from parallel.patch.compiled import install_compiled
from parallel.errors import ConfigError
from parallel.patch.context import PatchContext
from parallel.patch.kernels import choose_kernel, kernel_function
from parallel.registry import strategy_of
from parallel.patch.vae import parallelize_vae
from parallel.patch.backbones import backbone_of


@dataclass
class RankOutput:
    """What a rank hands back: images and latents on rank 0 only, the report everywhere."""

    images: np.ndarray | None
    latents: np.ndarray | None
    report: dict


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # The process's peak RSS. VmHWM belongs to this process image; ru_maxrss would carry over
    # the parent's peak into a spawned rank (Linux keeps it across exec).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _with_wire_record(part: dict) -> dict:
    """The testing hook comms.wire_check: this request's operations, before the report's own gather."""
    if wire_check.recording():
        part["wire"] = wire_check.take_record()
    return part


def _host_sync_watch(cfg):
    """The pipeline callback arming the testing hook in engine.host_sync (None when off)."""
    if host_sync.detector() is None:
        return None
    first = strategy_of(cfg).steady_from(cfg.warmup_steps)

    def callback(pipe, step, timestep, kwargs):
        host_sync.arm(step + 1 >= first)  # watch the steps from `first` on
        return kwargs

    return callback


def _chain(callbacks):
    def callback(pipe, step, timestep, kwargs):
        for c in callbacks:
            kwargs = c(pipe, step, timestep, kwargs)
        return kwargs

    return callback


def _injected_fault(rank: int, prompt: str):
    """The pipeline callback of the testing hook in engine.faults (None when not armed)."""
    at_step = injected_fault_step(rank, prompt)
    if at_step is None:
        return None

    def callback(pipe, step, timestep, kwargs):
        if step == at_step:
            raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")
        return kwargs

    return callback


def _preview(runtime, request):
    """The pipeline callback that hands rank 0's previews to `runtime.preview_sink`. Under asg
    over ranks a tile rank holds its own region only, so every rank gets a callback that joins
    in assembling the preview's latent (`runtime.whole_latents`); otherwise rank 0 alone has
    one. None when the request asks for no previews. A preview is what the caller asked for,
    so its device-to-host copy is the one sync it costs."""
    sink = None if runtime.topo.rank != 0 else runtime.preview_sink
    whole = runtime.whole_latents
    if not request.preview_every or (sink is None and whole is None):
        return None

    def callback(pipe, step, timestep, kwargs):
        if (step + 1) % request.preview_every == 0:
            latents = kwargs["latents"] if whole is None else whole(kwargs["latents"])
            if sink is None:
                return kwargs
            with host_sync.requested():
                if request.preview == "image":
                    sink(step, decode_latents(pipe, spatial_latents(pipe, latents, request.height, request.width)))
                else:
                    sink(step, latents.float().cpu().numpy())
        return kwargs

    return callback


def _check_no_guess_mode(controlnet) -> None:
    """diffusers runs a ControlNet with global_pool_conditions in guess mode: on the
    conditional half only, with zero residuals for the other, which neither the row split nor
    asg's tiles take apart. Refused before the request's work, on every rank alike."""
    for net in getattr(controlnet, "nets", [controlnet]):
        if getattr(net.config, "global_pool_conditions", False):
            raise ConfigError("this ControlNet has global_pool_conditions (diffusers runs it in guess mode, on the "
                              "conditional half only): run it with strategy 'none'")


def make_runtime(model, topo: Topology, dtype: torch.dtype | None = None, setup=None):
    """The runtime for `model`: a streaming video runtime or the image runtime. `setup(pipe)`
    (image models) runs on the loaded pipeline before the parallel layers are installed."""
    from engine.models.video import is_video_model

    if is_video_model(model):
        from engine.runtime.video import VideoRuntime

        return VideoRuntime(model, topo, dtype)
    return RankRuntime(model, topo, dtype, setup)


class RankRuntime:
    def __init__(self, model, topo: Topology, dtype: torch.dtype | None = None, setup=None):
        self.model = str(model)  # a name, a directory, a hub id or a single-file checkpoint's path
        self.topo = topo
        injected_delay(topo.rank, "load")
        self.pipe = load_pipeline(model, topo.device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        if setup is not None:  # the caller's changes (processors, fused QKV, ...), before the install checks them
            setup(self.pipe)
        # Peers may load for longer than any collective's timeout: meet in the store first
        # (new_group and the weight check below are collective).
        store_barrier(topo, "loaded")
        self.stats = CommStats()
        self.ctx = PatchContext(topo, self.stats)
        backbone = backbone_of(self.pipe)
        self.attention = choose_kernel(topo.device, unet=getattr(self.pipe, "unet", None) is not None)
        if self.attention == "xformers":  # the unsplit path too, so exact still equals serial
            self.pipe.enable_xformers_memory_efficient_attention()
        self.ctx.attention_kernel = kernel_function(self.attention)
        backbone.install(self.pipe, self.ctx)
        self.denoiser = denoiser_of(self.pipe)
        install_compiled(self.denoiser, self.ctx)  # runs eagerly unless a request asks to compile
        self.info = info_from_pipeline(self.model, self.pipe)
        if self.info.align != backbone.align:  # validation and the parallel layers must agree
            raise RuntimeError(f"{model}: band alignment {self.info.align} != {backbone.align} of the parallel layers")
        self._scheduler_config = self.pipe.scheduler.config
        self._default_scheduler = type(self.pipe.scheduler)
        self._check_same_weights()
        self._install_parallel_decode()
        self.addons = AddOns(self.pipe, topo, self.stats, self.ctx, dtype)
        self._controlnet = None  # the request's ControlNet(s), set per request
        self.whole_latents = None  # during an asg request over ranks: assembles a preview's latent
        self.requests_per_rank = False  # torchrun: each rank built its request (checked to agree)
        self._progress = dict(disable=True)  # the pipeline's progress bar, set per request
        self.preview_sink = None  # rank 0: sink(step, preview) delivers previews to the caller

    def _install_parallel_decode(self) -> None:
        """With several ranks, every rank decodes a row band of the final latents, with its
        own PatchContext and byte counters (decode traffic is reported apart from denoising).
        A VAE the band-parallel decoder cannot split is decoded by rank 0 alone."""
        self.decode_stats = CommStats()
        self.decode_ctx = None
        if not self.topo.distributed:
            return
        ctx = PatchContext(self.topo, self.decode_stats, role="decode")
        ctx.attention_kernel = self.ctx.attention_kernel
        try:
            parallelize_vae(self.pipe.vae, ctx)
        except NotImplementedError:
            return
        self.decode_ctx = ctx

    def _check_same_weights(self) -> None:
        """Every rank must hold the same model, or patches silently disagree. The VAE too:
        with a parallel decode every rank decodes a band of the image."""
        if self.topo.distributed:
            check_same_weights(self.model, list(self.denoiser.parameters()) + list(self.pipe.vae.parameters()))

    def _set_scheduler(self, name: str | None, seed: int, options: tuple = ()) -> str:
        import inspect

        cls = resolve_scheduler(name) if name else self._default_scheduler
        accepted = inspect.signature(cls.__init__).parameters
        unknown = [k for k, _ in options if k not in accepted]
        if unknown:  # validated against the named scheduler; the model's default may differ
            raise ConfigError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}")
        options = dict(options)
        if "noise_sampler_seed" in accepted:
            options["noise_sampler_seed"] = seed  # SDE samplers: the request's noise on every rank, not the global RNG
        self.pipe.scheduler = cls.from_config(self._scheduler_config, **options)
        return cls.__name__

    def _denoise(self, request: GenerateRequest) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        extra = {}
        callbacks = [c for c in (_preview(self, request), _injected_fault(self.topo.rank, request.prompt[0]), _host_sync_watch(request.parallel)) if c]
        if callbacks:
            extra["callback_on_step_end"] = _chain(callbacks)
        pipe = pipeline_for(self.pipe, request, self._controlnet, self.addons.pipelines)
        pipe.set_progress_bar_config(**self._progress)
        extra.update(pipeline_call_kwargs(pipe))  # e.g. PixArt: exactly the requested size
        extra.update(call_kwargs(request))  # init image, mask, control images ...
        if request.num_images_per_prompt > 1:
            extra["num_images_per_prompt"] = request.num_images_per_prompt
        if request.cross_attention_kwargs:
            extra["cross_attention_kwargs"] = dict(request.cross_attention_kwargs)
        if request.negative_prompt:  # pipelines differ in their default (PixArt needs a string, not None)
            extra["negative_prompt"] = list(request.negative_prompt)
        out = pipe(
            prompt=list(request.prompt),
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
            output_type="latent",
            **extra,
        )
        host_sync.arm(False)  # the steps are over
        return out.images

    def _check_same_request(self, request: GenerateRequest) -> None:
        """Under torchrun every rank builds its own request; one that differs would pair
        collectives wrongly or hang, so it is refused on every rank, naming the fields."""
        differ = differing_in_store(self.topo, "request", request_digests(request))
        if differ:
            hint = (" (asg assembles each preview on every rank: pass callback and callback_steps on every rank; "
                    "a no-op callback on the others will do)" if "preview_every" in differ else "")
            raise ConfigError(f"under torchrun every rank must make the same request; the ranks' requests differ in "
                              f"{', '.join(differ)}{hint}")

    @torch.no_grad()
    def run(self, request: GenerateRequest) -> RankOutput:
        rank, device = self.topo.rank, self.topo.device
        cfg = request.parallel
        injected_delay(rank, "request")
        # Under torchrun a peer may still be busy with the last request (rank 0 comparing
        # against serial): meet in the store, which never times out, before any collective.
        store_barrier(self.topo, "request")
        if self.requests_per_rank:
            self._check_same_request(request)
        scheduler = self._set_scheduler(request.scheduler, request.seed, request.scheduler_options)
        self._progress = dict(disable=not (request.progress and rank == 0), leave=False)
        if request.release_controlnets:
            self._controlnet = None  # the last request's, or it would outlive the release
            self.addons.release_controlnets()
        self.addons.apply_adapters(request)
        self._controlnet = self.addons.controlnet_for(request.controlnets)
        if self._controlnet is not None and strategy_of(cfg).runner != "serial":
            _check_no_guess_mode(self._controlnet)
        self.stats.reset(trace=cfg.trace_comms)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        start = time.perf_counter()
        latents, asg_report, asg_rank = self._denoise_request(request)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # NCCL waits and kernels are asynchronous
            self.stats.resolve_cuda_waits()
        denoise_s = time.perf_counter() - start
        part = self._rank_part(cfg, denoise_s, asg_rank)
        # Both decode paths need (B, C, H, W); Flux packs its latents into tokens.
        spatial = spatial_latents(self.pipe, latents, request.height, request.width)
        decoded = self._decode_and_gather(spatial, part)
        if decoded is None:  # not rank 0: its part is in rank 0's report
            return RankOutput(None, None, {})
        images, decode_s, parts = decoded
        report = self._report(request, scheduler, time.perf_counter() - start, denoise_s, decode_s, parts)
        if asg_report is not None:
            report["asg"] = asg_report
        truncated = self._truncated_prompt(request)
        if truncated:
            report["prompt_truncated"] = truncated
        latents_np = latents.float().cpu().numpy()
        if request.compare_serial:
            report["vs_serial"] = self._compare_serial(request, images, latents_np)
        return RankOutput(images, latents_np, report)

    def _denoise_request(self, request: GenerateRequest):
        """The request's strategy: serial, tiles (asg) or row bands. Returns (latents, the
        asg report or None, this rank's asg counters)."""
        cfg = request.parallel
        self.ctx.use_compile(cfg.compile)
        try:
            runner = strategy_of(cfg).runner
            if runner == "tiles":
                return self._denoise_asg(request)
            if runner == "serial":
                return self._denoise(request), None, {}
            vae = self.info.vae_scale_factor
            contexts = [self.ctx] + self.addons.contexts(request.controlnets)
            for ctx in contexts:
                ctx.check_installed()
            for ctx in contexts:
                ctx.begin_request(cfg, request.height // vae, request.width // vae, self.info.align, request.cfg_split)
            try:
                latents = self._denoise(request)
            except BaseException:
                for ctx in contexts:
                    try:
                        ctx.end_request()
                    except Exception:
                        pass  # the original error is the one to report
                raise
            for ctx in contexts:
                ctx.end_request()
            return latents, None, {}
        finally:
            self.ctx.use_compile(False)

    def _rank_part(self, cfg, denoise_s: float, asg_rank: dict) -> dict:
        """This rank's share of the report: its compute, waits, traffic and memory."""
        device = self.topo.device
        totals = self.stats.totals()
        part = {
            "rank": self.topo.rank,
            "device": str(device),
            "compute_s": max(0.0, denoise_s - totals.comm_wait_s),
            "comm_wait_s": totals.comm_wait_s,
            "bytes_sent": totals.bytes_sent,
            "bytes_received": totals.bytes_received,
            "collectives": totals.collectives,
            "peak_mem_bytes": _peak_memory(device),
            "per_step": self.stats.per_step(),
            **asg_rank,
        }
        if cfg.trace_comms:
            part["trace"] = list(self.stats.trace)
        if host_sync.detector() is not None:
            part["host_syncs"] = host_sync.take_calls()
        return part

    def _decode_and_gather(self, spatial: torch.Tensor, part: dict):
        """Decode the final latents and gather every rank's part. Returns (images, decode
        seconds, parts) on rank 0, None elsewhere."""
        device, rank = self.topo.device, self.topo.rank
        decode_start = time.perf_counter()
        if self.decode_ctx is not None:
            # Every rank decodes a row band of the final latents (identical on every rank:
            # the denoiser's output is gathered everywhere), then the image bands are gathered.
            self.decode_stats.reset()
            images = decode_latents_parallel(self.pipe, spatial, self.decode_ctx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                self.decode_stats.resolve_cuda_waits()
            decode_s = time.perf_counter() - decode_start
            dec = self.decode_stats.totals()
            part.update(
                decode_s=decode_s,
                decode_comm_wait_s=dec.comm_wait_s,
                decode_bytes_sent=dec.bytes_sent,
                decode_bytes_received=dec.bytes_received,
                decode_collectives=dec.collectives,
                peak_mem_bytes=_peak_memory(device),  # denoise and decode
            )
            parts = all_gather_object(_with_wire_record(part))
            return (images, decode_s, parts) if rank == 0 else None
        # Gather before rank 0 decodes alone: peers must not sit in a collective meanwhile.
        parts = all_gather_object(_with_wire_record(part)) if self.topo.distributed else [part]
        if rank != 0:
            return None
        decode_start = time.perf_counter()
        images = decode_latents(self.pipe, spatial)
        return images, time.perf_counter() - decode_start, parts

    def _report(self, request: GenerateRequest, scheduler: str, latency_s: float, denoise_s: float,
                decode_s: float, parts: list) -> dict:
        cfg = request.parallel
        return {
            "model": self.model,
            "pipeline": self.info.pipeline,
            "strategy": cfg.strategy,
            "world_size": self.topo.world_size,
            "height": request.height,
            "width": request.width,
            "steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "seed": request.seed,
            "scheduler": scheduler,
            "warmup_steps": cfg.warmup_steps,
            "pcpp_portion": cfg.pcpp_portion if strategy_of(cfg).adjacent_kv else None,
            "gn_mode": cfg.gn_mode,
            "bucket_mb": cfg.bucket_mb,
            "compile": cfg.compile,
            "attention": self.attention,
            "cfg_split": request.cfg_split,
            "device": str(self.topo.device),
            "dtype": str(self.denoiser.dtype).replace("torch.", ""),
            "latency_s": latency_s,
            "denoise_s": denoise_s,
            "decode_s": decode_s,
            "decode": "parallel" if self.decode_ctx is not None else "serial",
            "per_rank": parts,
        }

    def _truncated_prompt(self, request: GenerateRequest) -> dict | None:
        """{tokens, kept} when the (first) text encoder cuts a prompt to its length, else None:
        the pipeline truncates silently."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return None
        limit = tokenizer.model_max_length
        longest = max(len(tokenizer(p).input_ids) for p in request.prompt)
        return {"tokens": longest, "kept": limit} if longest > limit else None

    def _denoise_asg(self, request: GenerateRequest, reference: bool = False) -> tuple[torch.Tensor, dict, dict]:
        """ASG: over the ranks (tiles on ranks 0..N-2, the branch on N-1), or with
        `reference` / one rank the single-process reference (every tile and the branch here).
        Returns (latents, the request's asg report, this rank's asg counters)."""
        cfg = request.parallel
        parallel = self.topo.distributed and not reference
        # img2img, inpainting and a refiner's or base's part run some of the steps only: the
        # guidance schedule (and the default detail steps) cover the denoiser calls that run
        variant = pipeline_for(self.pipe, request, self._controlnet, self.addons.pipelines)
        calls = denoiser_calls_run(variant, request)
        order = getattr(self.pipe.scheduler, "order", 1)
        steps = -(-calls // order)
        # asg_detail_steps (checked against the request's steps) are the last steps of those
        # that run: more than run means none is guided
        detail_asked = cfg.asg_detail_steps if cfg.asg_detail_steps is None else min(cfg.asg_detail_steps, steps)
        grid, detail = asg_plan(self.info, replace(cfg, world_size=self.topo.world_size if parallel else 1,
                                                   asg_detail_steps=detail_asked), request.height, request.width, steps)
        guided = request.guidance_scale > 1.0 and self.info.does_cfg
        self.ctx.enabled = False  # the denoiser runs whole tiles: no patch layers
        schedule = GuidanceSchedule.for_calls(calls, order, cfg.asg_strength, detail, cfg.asg_mask_floor)
        # the batch as diffusers lays it out: each prompt repeated num_images_per_prompt times
        prompts = [p for p in request.prompt for _ in range(request.num_images_per_prompt)]
        with structure_guided(self.pipe, self.denoiser, grid, schedule, prompts, guided,
                              topo=self.topo if parallel else None, stats=self.stats,
                              staleness=cfg.asg_staleness, controlnet=self._controlnet) as asg:
            self.whole_latents = asg.whole if parallel else None
            rescale = nullcontext()
            if parallel and request.guidance_rescale:  # its deviations span the whole latent
                rescale = rescaled_over_ranks(variant, asg.owned(), self.stats)
            try:
                with rescale:
                    latents = asg.finish(self._denoise(request))
            finally:
                self.whole_latents = None
        if asg.step != schedule.calls and self.topo.rank == 0:
            warnings.warn(f"asg planned its guidance over {schedule.calls} denoiser calls but the pipeline made "
                          f"{asg.step}: the schedule's cosine and detail steps were cut or stretched")
        mine = {}
        if parallel:
            waits = asg.guidance_wait_s
            mine = {"asg_role": "branch" if asg.is_branch else "tiles", "asg_tiles": len(asg.my_tiles),
                    "asg_branch_calls": asg.branch_calls,
                    "guidance_wait_s": float(sum(waits)), "guidance_wait_per_step_s": waits}
        return latents, {
            "tiles": len(grid.tiles), "tile_latent": [grid.tile_h, grid.tile_w], "overlap": grid.overlap,
            "strength": cfg.asg_strength, "detail_steps": detail, "staleness": cfg.asg_staleness,
            "mask_floor": cfg.asg_mask_floor, "denoiser_calls": asg.step, "scheduled_calls": schedule.calls,
            "mode": "parallel" if parallel else "single-process",
            # single-process: this rank ran the branch; over ranks it is each rank's asg_branch_calls
            **({} if parallel else {"branch_calls": asg.branch_calls}),
        }, mine

    def _compare_serial(self, request: GenerateRequest, images: np.ndarray, latents: np.ndarray) -> dict:
        """Run the same request serially on this rank (parallel layers bypassed) and compare.
        For asg the reference is the single-process run of the same algorithm."""
        self._progress = dict(disable=True)
        self.ctx.enabled = False
        sink, self.preview_sink = self.preview_sink, None  # the caller has had this request's previews
        start = time.perf_counter()
        try:
            if strategy_of(request.parallel).runner == "tiles":
                ref_latents = self._denoise_asg(request, reference=True)[0]
            else:
                ref_latents = self._denoise(request)
        finally:
            self.preview_sink = sink
        serial_s = time.perf_counter() - start
        ref_images = decode_latents(self.pipe, spatial_latents(self.pipe, ref_latents, request.height, request.width))
        metrics = compare(images, ref_images, latents, ref_latents.float().cpu().numpy())
        metrics["serial_denoise_s"] = serial_s
        return metrics
