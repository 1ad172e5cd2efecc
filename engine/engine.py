"""Engine: the API users call.

    engine = Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(strategy="patch", world_size=2))
    result = engine.generate("a red circle", height=512, width=512, seed=1)
    result.images[0].save("out.png"); result.report

Three ways to run, chosen from the environment and the world size:
- under torchrun (RANK/WORLD_SIZE set): every rank calls the same code (SPMD); rank 0's
  result holds the images, other ranks get an empty result;
- `world_size=N` from one process: N local worker ranks are spawned and driven;
- world size 1: plain serial diffusers in this process, the reference.

`launcher="ray"` runs the N ranks as Ray actors instead (one node or a cluster); requests
from several threads are served one at a time, in arrival order, on any launcher.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from comms import groups
from engine.models import check_model_spec
from engine.request import build_request
from parallel.config import ConfigError, ParallelConfig
from parallel.registry import default_strategy, names, strategy_of


@dataclass
class GenerateResult:
    images: list = field(default_factory=list)  # PIL images (rank 0 / the caller)
    latents: torch.Tensor | None = None  # final latents before decoding
    report: dict = field(default_factory=dict)

    @property
    def image(self):
        return self.images[0] if self.images else None

    def save_report(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(_json_safe(self.report), f, indent=2)
        return path


def _json_safe(value):
    """JSON has no infinity: an identical-to-serial PSNR is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _check_device(device, world: int, local_ranks: int | None, cluster: bool = False) -> None:
    """Devices are chosen per rank from its local rank; refuse what cannot work. On a Ray
    cluster the GPUs are counted by the launcher, not on the driver's machine."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if cluster:
            if dev.index is not None and world > 1:
                raise ConfigError(f"device {device!r} names one GPU for {world} ranks; pass 'cuda'")
            return
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but CUDA is not available on this machine")
        if dev.index is not None and world > 1:
            raise ConfigError(f"device {device!r} names one GPU for {world} ranks; pass 'cuda' (each rank takes its local GPU)")
        spawned = world if local_ranks is None else int(os.environ.get("LOCAL_WORLD_SIZE", local_ranks))
        if spawned > torch.cuda.device_count():
            raise ConfigError(f"{spawned} local ranks but only {torch.cuda.device_count()} GPUs on this machine")


class _InProcess:
    """Serial, or one rank of a torchrun job: the runtime lives in this process."""

    def __init__(self, model, parallel: ParallelConfig, rank, world, local_rank, device, dtype):
        from engine.runtime import make_runtime

        self.watch = None
        if world > 1:
            from comms.failure import FailureWatch, store_address

            address = store_address()
            if address:
                self.watch = FailureWatch(rank, *address)
        try:
            topo = groups.init_distributed(rank, world, local_rank, device, parallel.comm_timeout_s)
            self.runtime = make_runtime(model, topo, dtype)
        except BaseException as exc:
            self._report(exc)
            raise
        self.info = self.runtime.info

    def _report(self, exc):
        if self.watch is not None:
            self.watch.report(exc)

    def run(self, request):
        try:
            return self.runtime.run(request)
        except BaseException as exc:
            self._report(exc)
            raise

    def stream(self, request):
        try:
            yield from self.runtime.stream(request)
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._report(exc)
            raise
        finally:
            self.last_reports = [getattr(self.runtime, "last_report", None)]

    def close(self):
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        groups.shutdown()


LAUNCHERS = ("local", "ray")


class Engine:
    def __init__(self, model: str, parallel: ParallelConfig, backend, launch: str):
        self.model = model
        self.parallel = parallel
        self._backend = backend
        self.launch = launch  # "serial", "torchrun", "local" or "ray"
        self.info = backend.info
        self._respawn = None  # rebuilds a launched rank group (local or Ray)
        self._lock = threading.Lock()  # one request at a time, in arrival order
        self._open_stream = None  # the VideoStream in progress, if any

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny-sd",
        parallel: ParallelConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        launcher: str = "local",
        address: str | None = None,
    ) -> "Engine":
        """Load `model` (preset, local directory or hub id) on every rank of the world.

        `launcher`: "local" (spawned processes on this machine) or "ray" (Ray actors; `address`
        names a running cluster, else RAY_ADDRESS, else a private one-node cluster is started).
        Under torchrun, or with one rank, the launcher is not used."""
        check_model_spec(model)
        if launcher not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
        if address is not None and launcher != "ray":
            raise ConfigError("address names a Ray cluster; it needs launcher='ray'")
        env = groups.env_world()
        if env is not None and env[1] > 1 and launcher == "ray":
            raise ConfigError("launcher='ray' starts its own ranks; do not run it under torchrun")
        from engine.video import is_video_model

        video = is_video_model(model)
        if parallel is None:
            world = env[1] if env else 1
            parallel = ParallelConfig(strategy=default_strategy(world, video), world_size=world)
        parallel = parallel.validate()
        if video and not strategy_of(parallel).streams_video:
            raise ConfigError(f"{model} is a streaming video model: use strategy "
                              f"{' or '.join(repr(n) for n in names(lambda s: s.streams_video))} (serial: one rank), "
                              f"not {parallel.strategy!r}")
        ray = launcher == "ray"
        _check_device(device, env[1] if env else parallel.world_size or 1,
                      local_ranks=1 if env or ray else None, cluster=ray)
        if env is not None and env[1] > 1:
            rank, world, local_rank = env
            if parallel.world_size not in (None, world):
                raise ConfigError(f"world_size={parallel.world_size} but torchrun started {world} ranks")
            parallel = replace(parallel, world_size=world)
            return cls(model, parallel, _InProcess(model, parallel, rank, world, local_rank, device, dtype), "torchrun")
        world = parallel.world_size or 1
        parallel = replace(parallel, world_size=world)
        if world == 1:
            return cls(model, parallel, _InProcess(model, parallel, 0, 1, 0, device, dtype), "serial")
        if ray:
            from launch.ray_launcher import RayLauncher

            def respawn():
                return RayLauncher(model, parallel, world, device, dtype, address=address)
        else:
            from launch.local import LocalLauncher

            def respawn():
                return LocalLauncher(model, parallel, world, device, dtype)
        engine = cls(model, parallel, respawn(), launcher)
        engine._respawn = respawn
        return engine

    @property
    def rank(self) -> int:
        return self._backend.runtime.topo.rank if isinstance(self._backend, _InProcess) else 0

    def generate(
        self,
        prompt,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        seed: int = 0,
        negative_prompt=None,
        scheduler: str | None = None,
        compare_serial: bool = False,
        parallel: ParallelConfig | None = None,
        progress: bool = True,
    ) -> GenerateResult:
        """Generate images for `prompt` (a string or a list). `parallel` may change the
        strategy, warm-up, portion, ASG settings, CFG split ... for this request; not the world size."""
        if parallel is not None:
            if parallel.world_size not in (None, self.parallel.world_size):
                raise ConfigError("a request cannot change the world size; make a new engine")
            parallel = replace(parallel, world_size=self.parallel.world_size)
        request = build_request(
            self.info,
            parallel or self.parallel,
            prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            negative_prompt=negative_prompt,
            scheduler=scheduler,
            compare_serial=compare_serial,
            progress=progress,
        )
        with self._lock:
            self._check_no_open_stream()
            output = self._backend.run(request)
        if output.images is None:
            return GenerateResult(report=output.report)
        from PIL import Image

        report = dict(output.report, launch=self.launch)
        return GenerateResult(
            images=[Image.fromarray(np.ascontiguousarray(img)) for img in output.images],
            latents=torch.from_numpy(output.latents),
            report=report,
        )

    def stream(self, prompt: str, num_chunks: int | None = None, steps: int | None = None, seed: int = 0,
               height: int | None = None, width: int | None = None, kv_window: int | None = None,
               progress: bool = False, float_frames: bool = False) -> "VideoStream":
        """Stream video frames for `prompt` from a causal video model: an iterator of frames,
        (H, W, 3) uint8 numpy arrays, produced while you consume them. `num_chunks=None`
        streams until you stop iterating (or call `.close()`), which stops every rank.
        `steps` per chunk, frame size and `kv_window` default to the model's settings;
        `float_frames` gives float32 frames in [0, 1] as decoded. The stream's `report`
        (throughput, time to first frame, per-rank busy/wait and bytes) is set when it ends."""
        from engine.stream import build_stream_request
        from engine.streaming import VideoStream

        if getattr(self.info, "kind", "image") != "video":
            raise ConfigError(f"{self.model} is an image model: stream needs a causal video model "
                              "(e.g. tiny-causal-video); use generate()")
        if self.launch == "torchrun" and num_chunks is None:
            raise ConfigError("under torchrun a stream needs num_chunks: a caller on one rank cannot stop the others")
        request = build_stream_request(self.info, self.parallel.strategy, self.parallel.world_size or 1, prompt,
                                       num_chunks, steps, seed, height, width, kv_window)
        return VideoStream(self, request, progress, float_frames)

    def _check_no_open_stream(self) -> None:
        if self._open_stream is not None:
            raise RuntimeError("a stream is still open on this engine: exhaust it or call stream.close() "
                               "(or use `with engine.stream(...) as stream:`) before the next request")

    def restart(self) -> None:
        """Bring a failed rank group back: new local processes or Ray actors (a torchrun job
        restarts through torchrun)."""
        if self._respawn is None:
            raise RuntimeError("restart() applies to engines whose ranks it launched (local or Ray)")
        with self._lock:
            self._backend.close()
            self._backend = self._respawn()

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
