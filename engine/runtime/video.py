"""Streaming video: the timestep-forcing algorithm, on one rank or pipelined over ranks.

The algorithm (after Self-Forcing / StreamDiT-style causal few-step models): chunk c starts
as noise; step k (k = 0..T-1) runs the model once at noise level sigma_k with the KV cache
*of step k*, writes the chunk's keys/values into that cache (timestep forcing: cache k holds
past chunks as they looked at noise level k; there is no extra clean pass), and takes the
Euler step to sigma_{k+1}. After step T-1 the chunk is clean and is decoded into frames.

- `strategy="none"` (one rank) runs the steps of each chunk in order, one cache per step:
  the reference and the baseline.
- `strategy="tpp"`: rank r owns a run of steps (`parallel.tpp.StagePlan`) and their caches,
  receives each chunk's latent from rank r - 1 (rank 0 draws the noise), runs its steps and
  sends the latent on asynchronously (`comms.chunk_link.ChunkLink`); the last rank decodes.
  The loop is `parallel.tpp.run_chunk_pipeline`; this module supplies the model's parts.
  Every rank does exactly the computations the single rank does, on the same inputs, so the
  frames are equal (up to float reassociation where ranks use other thread counts; the
  tests allow a relative L2 of 1e-5 and measure 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from comms import CommStats, wire_check
from comms.collectives import check_same_weights
from comms.chunk_link import ChunkLink
from comms.groups import store_barrier
from engine.models.causal_video import ChunkKVCache
from engine import host_sync
from engine.faults import FAULT_ENV, injected_delay, injected_fault_step
from engine.models.video import VideoModel, flow_sigmas, load_video_model, wan_vae_factor
from parallel.config import ConfigError, is_int
from parallel.registry import strategy_of, video_strategies
from parallel.tpp import ChunkStage, PipelineCounters, StagePlan, run_chunk_pipeline


@dataclass(frozen=True)
class VideoInfo:
    """What validation needs to know about a video model, from its configs alone."""

    name: str
    frames_per_chunk: int
    height: int
    width: int
    steps: int
    max_steps: int
    kv_window: int
    shift: float
    spatial_factor: int  # pixels per latent token side: VAE factor x patch size
    kind: str = "video"


def video_info(model: VideoModel) -> VideoInfo:
    s = model.spec
    return VideoInfo(model.name, s.frames_per_chunk, s.height, s.width, s.steps, s.max_steps, s.kv_window,
                     s.shift, model.vae_factor * model.transformer.config.patch_size[1])


def describe_video(spec: str) -> VideoInfo:
    """VideoInfo from configs alone (a preset is cheap to build), to validate before launch."""
    import json
    import os

    from engine.models.video import VIDEO_PRESETS, StreamSpec

    if spec in VIDEO_PRESETS:
        return video_info(load_video_model(spec))

    def read(*parts):
        with open(os.path.join(spec, *parts)) as f:
            return json.load(f)

    s = StreamSpec(**read("stream_config.json"))
    factor = wan_vae_factor(read("vae", "config.json")["dim_mult"]) * read("transformer", "config.json")["patch_size"][1]
    return VideoInfo(os.path.basename(os.path.normpath(spec)), s.frames_per_chunk, s.height, s.width, s.steps,
                     s.max_steps, s.kv_window, s.shift, factor)


@dataclass(frozen=True)
class StreamRequest:
    prompt: str
    num_chunks: int | None  # None: until the caller stops
    steps: int
    seed: int
    height: int
    width: int
    kv_window: int
    strategy: str  # "none" or "tpp"
    world_size: int


def build_stream_request(info: VideoInfo, strategy: str, world_size: int, prompt: str, num_chunks=None,
                         steps: int | None = None, seed: int = 0, height: int | None = None,
                         width: int | None = None, kv_window: int | None = None) -> StreamRequest:
    """Check a stream request before any rank works; errors say what to change."""
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("stream needs one non-empty prompt string")
    kind = strategy_of(strategy)
    if not kind.streams_video:
        raise ConfigError(f"a video model streams with strategy {video_strategies()}; got {strategy!r}")
    steps = info.steps if steps is None else steps
    if not is_int(steps) or not 1 <= steps <= info.max_steps:
        raise ConfigError(f"{info.name}: steps per chunk must be an integer in 1..{info.max_steps} "
                          f"(the few-step schedule allows at most {info.max_steps}), got {steps!r}")
    if num_chunks is not None and (not is_int(num_chunks) or num_chunks < 1):
        raise ConfigError(f"num_chunks must be a positive integer or None (endless), got {num_chunks!r}")
    height, width = height or info.height, width or info.width
    f = info.spatial_factor
    if height % f or width % f or height <= 0 or width <= 0:
        raise ConfigError(f"{info.name}: frame size {height}x{width} must be a positive multiple of {f} "
                          "(the VAE factor times the patch size)")
    kv_window = info.kv_window if kv_window is None else kv_window
    if not is_int(kv_window) or kv_window < 0:
        raise ConfigError(f"kv_window must be a non-negative integer (chunks), got {kv_window!r}")
    if kind.multi_rank:
        StagePlan.build(steps, world_size)  # raises when there are more ranks than steps
    elif world_size != 1:
        raise ConfigError(f"strategy {strategy!r} streams on one rank; this engine has {world_size} "
                          f"(use {video_strategies(several_ranks_only=True)})")
    return StreamRequest(prompt, num_chunks, steps, seed, height, width, kv_window, strategy, world_size)


class BusyClock:
    """Time spent computing chunks: host time on CPU; on CUDA, events on the compute stream,
    read once when the stream ends (one synchronisation per stream, none per chunk)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self.seconds = 0.0
        self._began = None

    def start(self) -> None:
        if self.cuda:
            self._began = torch.cuda.Event(enable_timing=True)
            self._began.record()
        else:
            self._began = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((self._began, end))
        else:
            self.seconds += time.perf_counter() - self._began

    def total(self) -> float:
        if self.spans:
            self.spans[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.spans) / 1000.0
            self.spans = []
        return self.seconds


class VideoRuntime:
    """One rank's video model and its part of a stream (the whole stream with one rank)."""

    def __init__(self, model: str, topo, dtype: torch.dtype | None = None):
        self.topo = topo
        injected_delay(topo.rank, "load")
        self.model = load_video_model(model, topo.device, dtype)
        self.info = video_info(self.model)
        self.dtype = next(self.model.transformer.parameters()).dtype
        self._check_same_weights()
        self._streams = 0

    def _check_same_weights(self) -> None:
        if self.topo.distributed:
            store_barrier(self.topo, "loaded")  # peers may load for longer than a collective's timeout
            check_same_weights(self.info.name, list(self.model.transformer.parameters())
                               + list(self.model.vae.parameters()))

    def run(self, request):
        raise ConfigError(f"{self.info.name} is a streaming video model: call engine.stream(...), not generate")

    def stream(self, request: StreamRequest, should_stop=lambda: False, may_start=lambda chunk: None):
        """Yield (chunk, frames, seconds since start) on the decoding rank (other ranks yield
        nothing); when the generator ends, `self.last_report` is this rank's report.
        `should_stop()` is asked by rank 0 before each chunk; `may_start(chunk)` lets a
        launcher hold rank 0 back while the consumer is behind (backpressure)."""
        device = self.topo.device
        ranks = request.world_size if strategy_of(request.strategy).multi_rank else 1
        rank = self.topo.rank if ranks > 1 else 0
        plan = StagePlan.build(request.steps, ranks)
        mine = plan.steps_of(rank)
        model, spec = self.model, self.model.spec
        frames = spec.frames_per_chunk
        f = model.vae_factor
        shape = (1, model.latent_channels, frames, request.height // f, request.width // f)
        stats = CommStats()
        self._streams += 1  # every rank serves the same streams in order: a shared id
        link = ChunkLink(rank, shape, self.dtype, device, stats, stream_id=self._streams) if ranks > 1 else None
        sigmas = flow_sigmas(request.steps, spec.shift).tolist()  # host numbers: no tensor read per step
        caches = {k: ChunkKVCache(model.num_layers, request.kv_window) for k in mine}
        text = model.encode_prompt(request.prompt, device).to(self.dtype)
        generator = torch.Generator("cpu").manual_seed(request.seed) if rank == 0 else None
        fault_at = injected_fault_step(rank)
        busy_clock = BusyClock(device)  # compute time, without syncing a device per chunk
        cache_chunks, cache_bytes = [], []
        counters = PipelineCounters()

        def before_chunk(chunk):
            stats.step = chunk
            host_sync.arm(chunk >= 1)  # testing hook: watch every chunk after the first

        def noise():
            drawn = torch.randn(shape, generator=generator, dtype=torch.float32)
            if device.type == "cuda":
                drawn = drawn.pin_memory()  # copied to the GPU without stalling the host
            return drawn.to(device, self.dtype, non_blocking=True)

        def denoise(latent, chunk):
            busy_clock.start()
            with torch.no_grad():
                for k in mine:
                    # float32 even for a bf16 model: bf16 would round the timestep (936 for 937.5)
                    t = torch.full((1,), float(sigmas[k]) * 1000.0, dtype=torch.float32, device=device)
                    flow = model.transformer.forward_chunk(latent, t, text, caches[k], frame_offset=chunk * frames)
                    latent = latent + float(sigmas[k + 1] - sigmas[k]) * flow
            busy_clock.stop()
            if mine:
                cache_chunks.append(caches[mine[0]].chunks_held)
                cache_bytes.append(sum(c.nbytes() for c in caches.values()))
            if chunk == fault_at:
                raise RuntimeError(f"injected fault at chunk {chunk} ({FAULT_ENV})")
            return latent

        def decode(latent):
            host_sync.arm(False)  # frames go to the host: the one sync a consumer needs
            return model.decode(latent)

        stage = ChunkStage(noise, denoise, decode, before_chunk)
        start = time.perf_counter()
        pipeline = run_chunk_pipeline(plan, rank, link, stage, request.num_chunks, counters, should_stop, may_start)
        try:
            try:
                for chunk, video in pipeline:
                    yield chunk, video, time.perf_counter() - start
            finally:
                pipeline.close()  # a consumer that stopped early: the pipeline drains its upstream now
        finally:
            host_sync.arm(False)
            busy = busy_clock.total()
            if device.type == "cuda":
                stats.resolve_cuda_waits()
            totals = stats.totals()
            elapsed = time.perf_counter() - start
            decode_s, throttled = counters.decode_s, counters.throttled_s
            self.last_report = {
                "rank": rank, "steps": list(mine), "chunks": counters.chunks, "elapsed_s": elapsed,
                "busy_s": busy + decode_s, "decode_s": decode_s, "wait_s": totals.comm_wait_s + throttled,
                "backpressure_s": throttled,
                "busy_fraction": (busy + decode_s) / elapsed if elapsed > 0 else 0.0,
                "wait_fraction": (totals.comm_wait_s + throttled) / elapsed if elapsed > 0 else 0.0,
                "bytes_sent": totals.bytes_sent, "bytes_received": totals.bytes_received,
                "cache_chunks_per_chunk": cache_chunks, "cache_bytes_per_chunk": cache_bytes,
            }
            if host_sync.detector() is not None:
                self.last_report["host_syncs"] = host_sync.take_calls()
            if wire_check.recording():
                self.last_report["wire"] = wire_check.take_record()
