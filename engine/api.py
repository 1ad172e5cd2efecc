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

import os
import threading
import warnings
from dataclasses import replace

import numpy as np
import torch

from comms import groups
from engine.budget import check_request_memory
from engine.models import check_model_spec
from engine.models.single_file import model_spec
from engine.quiet import quiet_libraries
from engine.requests import build_request
from engine.workflows import check_ip_adapter, check_lora, check_setup
from engine.results import GenerateResult, VideoStream
from launch.backend import Backend
from launch.inprocess import InProcess
from parallel.config import ConfigError, ParallelConfig, is_int
from parallel.registry import default_strategy, strategy_of, video_strategies


DEVICE_TYPES = ("cpu", "cuda")
# Fixed for the engine's life: the ranks' communicators and threads are set up with them.
ENGINE_FIELDS = ("world_size", "comm_timeout_s", "threads_per_rank")


def check_device(device, world: int, local_ranks: int | None, cluster: bool = False) -> str:
    """Devices are chosen per rank from its local rank; refuse what cannot work. On a Ray
    cluster the GPUs are counted by the launcher, not on the driver's machine. Returns the
    device type the ranks compute on."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cpu" and local_ranks is None and world > (os.cpu_count() or 1):
        warnings.warn(f"{world} ranks on {os.cpu_count()} CPU cores: ranks will wait for each other's cores "
                      "(slower than fewer ranks)", stacklevel=3)
    if dev.type == "cuda":
        if cluster:
            if dev.index is not None and world > 1:
                raise ConfigError(f"device {device!r} names one GPU for {world} ranks; pass 'cuda'")
            return dev.type
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but CUDA is not available on this machine")
        if dev.index is not None and world > 1:
            raise ConfigError(f"device {device!r} names one GPU for {world} ranks; pass 'cuda' (each rank takes its local GPU)")
        spawned = world if local_ranks is None else int(os.environ.get("LOCAL_WORLD_SIZE", local_ranks))
        if spawned > torch.cuda.device_count():
            raise ConfigError(f"{spawned} local ranks but only {torch.cuda.device_count()} GPUs on this machine")
    return dev.type


LAUNCHERS = ("local", "ray")


def _refuse_in_spawned_import() -> None:
    """A spawned rank imports the caller's script again; a script without a `__main__` guard
    would make an engine (and spawn ranks) from inside every rank. Say so, in that rank."""
    import multiprocessing.process

    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        raise RuntimeError(
            "Engine.from_pretrained ran while a spawned rank was importing your script: put the script's "
            "code under `if __name__ == \"__main__\":` (each local rank imports the main module again)")


def _callback_steps(callback, steps) -> int:
    """How often rank 0 sends a preview: 0 without a callback."""
    if callback is None:
        return 0
    if not callable(callback):
        raise ConfigError(f"callback must be a function (step, preview), got {type(callback).__name__}")
    if not is_int(steps) or steps < 1:
        raise ConfigError(f"callback_steps must be a positive integer, got {steps!r}")
    return steps


class Engine:
    def __init__(self, model: str, parallel: ParallelConfig, backend: Backend, launch: str):
        self.model = model
        self.parallel = parallel
        self._backend = backend
        self.launch = launch  # "serial", "torchrun", "local" or "ray"
        self.info = backend.info
        self._respawn = None  # rebuilds a launched rank group (local or Ray)
        self._lock = threading.Lock()  # one request at a time, in arrival order
        self._open_stream = None  # the VideoStream in progress, if any
        # LoRA adapters: loaded on the ranks with the next request (one trip, like its images)
        # Adapters: the state every request asks the ranks to hold (engine.runtime.addons).
        self.adapters: dict[str, float] = {}  # LoRA name -> default weight
        self._lora_sources: dict = {}  # LoRA name -> path or state dict
        self._lora_confirmed: set = set()  # names every rank holds (their sources need not travel)
        self._ip_adapter: tuple | None = None  # (source, subfolder, weight name, scale)
        self._release_controlnets = False
        self.auto_restart = False  # bring a failed group back before the next request
        self._closed = False  # closed by the caller (never auto-restarted)
        self.device_type = "cpu"  # what the ranks compute on, for the memory bound
        self.local_ranks = 1  # ranks sharing this machine's memory (the local launcher: all)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny-sd",
        parallel: ParallelConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        launcher: str = "local",
        address: str | None = None,
        auto_restart: bool = False,
        setup=None,
        config: str | None = None,
    ) -> "Engine":
        """Load `model` (preset, local diffusers directory, single-file checkpoint or hub id) on
        every rank of the world. A single-file checkpoint (SD 1.x / SDXL `.safetensors` or `.ckpt`
        in the original layout) takes `config`: a diffusers directory of the same architecture
        whose configs and tokenizers convert it (or its hub id, where the hub may be used).

        `launcher`: "local" (spawned processes on this machine) or "ray" (Ray actors; `address`
        names a running cluster, else RAY_ADDRESS, else a private one-node cluster is started).
        Under torchrun, or with one rank, the launcher is not used. `auto_restart`: after a
        rank died or the group failed, the next request first brings the group back
        (`restart()`); the failed request itself still raises. `setup(pipe)`: a picklable
        (top-level) function each rank calls on its loaded pipeline before the parallel layers
        are installed and checked, for what the API does not cover (e.g. fused QKV, another
        attention processor, a custom module); every rank must make the same change."""
        _refuse_in_spawned_import()
        spec = check_model_spec(model_spec(model, config))  # what the ranks load
        model = str(spec)
        check_setup(setup, model)
        if launcher not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
        if address is not None and launcher != "ray":
            raise ConfigError("address names a Ray cluster; it needs launcher='ray'")
        if not isinstance(auto_restart, bool):
            raise ConfigError(f"auto_restart must be True or False, got {auto_restart!r}")
        env = groups.env_world()
        quiet_libraries(env[0] if env else 0)  # this process may load the model (serial, torchrun)
        if env is not None and env[1] > 1 and launcher == "ray":
            raise ConfigError("launcher='ray' starts its own ranks; do not run it under torchrun")
        from engine.models.video import is_video_model

        video = is_video_model(model)
        if parallel is None:
            world = env[1] if env else 1
            parallel = ParallelConfig(strategy=default_strategy(world, video), world_size=world)
        parallel = parallel.validate()
        if video and not strategy_of(parallel).streams_video:
            raise ConfigError(f"{model} is a streaming video model: use strategy {video_strategies()}, "
                              f"not {parallel.strategy!r}")
        ray = launcher == "ray"
        device_type = check_device(device, env[1] if env else parallel.world_size or 1,
                                    local_ranks=1 if env or ray else None, cluster=ray)
        if env is not None and env[1] > 1:
            rank, world, local_rank = env
            if parallel.world_size not in (None, world):
                raise ConfigError(f"world_size={parallel.world_size} but torchrun started {world} ranks")
            parallel = replace(parallel, world_size=world)
            engine = cls(model, parallel, InProcess(spec, parallel, rank, world, local_rank, device, dtype, setup), "torchrun")
            engine.device_type, engine.local_ranks = device_type, int(os.environ.get("LOCAL_WORLD_SIZE", world))
            return engine
        world = parallel.world_size or 1
        parallel = replace(parallel, world_size=world)
        if world == 1:
            engine = cls(model, parallel, InProcess(spec, parallel, 0, 1, 0, device, dtype, setup), "serial")
            engine.device_type = device_type
            return engine
        if ray:
            from launch.ray_launcher import RayLauncher

            def respawn():
                return RayLauncher(spec, parallel, world, device, dtype, address=address, setup=setup)
        else:
            from launch.local import LocalLauncher

            def respawn():
                return LocalLauncher(spec, parallel, world, device, dtype, setup=setup)
        engine = cls(model, parallel, respawn(), launcher)
        engine._respawn = respawn
        engine.auto_restart = auto_restart
        # Ray ranks may live on other machines: only an explicit memory_limit_gb bounds them
        engine.device_type, engine.local_ranks = device_type, None if ray else world
        return engine

    @property
    def rank(self) -> int:
        return self._backend.runtime.topo.rank if isinstance(self._backend, InProcess) else 0

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
        image=None,
        mask_image=None,
        strength: float | None = None,
        controlnet=(),
        control_image=None,
        controlnet_conditioning_scale=1.0,
        guidance_rescale: float = 0.0,
        adapters: dict | None = None,
        num_images_per_prompt: int = 1,
        cross_attention_kwargs: dict | None = None,
        scheduler_options: dict | None = None,
        memory_limit_gb: float | None = None,
        callback=None,
        callback_steps: int = 1,
        preview: str = "latents",
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        ip_adapter_image=None,
    ) -> GenerateResult:
        """Generate images for `prompt` (a string or a list). `parallel` may change the
        strategy, warm-up, portion, ASG settings, CFG split ... for this request; not the world
        size, timeout or threads. A request whose estimated memory per rank exceeds
        `memory_limit_gb` (None: this machine's memory per rank; math.inf: no bound) is refused
        before any rank works (engine/budget.py).

        Add-ons (SD 1.x / SDXL; img2img and inpainting also SD3 and Flux):
        - `image` (PIL image, uint8 array or path) with `strength`: img2img; with `mask_image`
          (white = repaint): inpainting. Height and width default to the image's size.
        - `controlnet`: a ControlNet (preset such as "tiny-controlnet", directory or hub id) or
          a list of them, with one `control_image` each and `controlnet_conditioning_scale`.
          ControlNets load on the ranks with the first request that names them.
        - `adapters`: {name: weight} of LoRA adapters loaded with `load_lora` for this request
          (default: every loaded adapter at its load weight).
        - `num_images_per_prompt`, `guidance_rescale`, `cross_attention_kwargs` (e.g. a LoRA
          scale) and `scheduler_options` (e.g. {"use_karras_sigmas": True}) as in diffusers.
        - `callback(step, preview)` is called in this process every `callback_steps` steps with
          rank 0's current latents (`preview="latents"`, a float32 numpy array) or their
          decoded images (`preview="image"`, uint8 (B, H, W, 3)).
        - SDXL base and refiner: `denoising_end=0.8` stops the base there (its `result.latents`
          are the hand-over); the refiner's engine takes them as `image=` with `denoising_start=0.8`.
        - `ip_adapter_image`: the image prompt of the IP-Adapter loaded with `load_ip_adapter`."""
        if parallel is not None:
            fixed = {}
            for name in ENGINE_FIELDS:  # left at its default: the engine's; set otherwise: refused
                value, engine_value = getattr(parallel, name), getattr(self.parallel, name)
                if value not in (engine_value, getattr(ParallelConfig, name)):
                    raise ConfigError(f"a request cannot change {name} (this engine's is {engine_value!r}); "
                                      "make a new engine with it")
                fixed[name] = engine_value
            parallel = replace(parallel, **fixed)
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
            image=image,
            mask_image=mask_image,
            strength=strength,
            controlnet=controlnet,
            control_image=control_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            guidance_rescale=guidance_rescale,
            adapters=adapters,
            loaded_adapters=tuple(self.adapters),
            num_images_per_prompt=num_images_per_prompt,
            cross_attention_kwargs=cross_attention_kwargs,
            scheduler_options=scheduler_options,
            preview_every=_callback_steps(callback, callback_steps),
            preview=preview,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_loaded=self._ip_adapter is not None,
        )
        check_request_memory(self.info, request, self.local_ranks, self.device_type, memory_limit_gb)
        with self._lock:
            self._check_no_open_stream()
            self._restart_if_failed()
            loras = tuple((name, None if name in self._lora_confirmed else self._lora_sources[name], weight)
                          for name, weight in self.adapters.items())
            request = replace(request, loras=loras, ip_adapter=self._ip_adapter,
                              release_controlnets=self._release_controlnets)
            self._lora_confirmed = set()  # until the ranks answer (a failed request may leave them anywhere)
            output = self._backend.run(request, on_preview=callback) if callback else self._backend.run(request)
            self._lora_confirmed = set(self.adapters)
            self._release_controlnets = False
        if output.images is None:
            return GenerateResult(report=output.report)
        from PIL import Image

        report = dict(output.report, launch=self.launch)
        return GenerateResult(
            images=[Image.fromarray(np.ascontiguousarray(img)) for img in output.images],
            latents=torch.from_numpy(np.require(output.latents, requirements="W")),  # Ray hands back read-only arrays
            report=report,
        )

    def load_lora(self, name: str, source, weight: float = 1.0) -> None:
        """Load a LoRA adapter (a .safetensors file, a directory or hub id diffusers'
        `load_lora_weights` reads, or a state dict) as `name` on every rank, with the next
        request. It is active at `weight` in every request until unloaded, unless a request
        passes `adapters={...}`. Conv LoRA layers are patch-parallel too (exact in patch-sync)."""
        check_lora(name, source, weight, self.info)
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} is already loaded; unload_lora({name!r}) first")
        self.adapters[name] = float(weight)
        self._lora_sources[name] = source

    def load_ip_adapter(self, source: str, subfolder: str | None = "models",
                        weight_name: str | None = "ip-adapter_sd15.bin", scale: float = 1.0) -> None:
        """Load an IP-Adapter (the preset "tiny-ip-adapter", or what diffusers'
        `load_ip_adapter(source, subfolder, weight_name)` reads, with its image encoder) on
        every rank with the next request; from then on requests pass `ip_adapter_image`.
        Self-attention stays patch-parallel (the loader's rebuilt processors are wrapped again)."""
        check_ip_adapter(source, scale, self.info)
        if self._ip_adapter is not None:
            raise ConfigError(f"an IP-Adapter ({self._ip_adapter[0]}) is loaded; unload_ip_adapter() first")
        self._ip_adapter = (source, subfolder, weight_name, float(scale))

    def unload_ip_adapter(self) -> None:
        if self._ip_adapter is None:
            raise ConfigError("no IP-Adapter is loaded")
        self._ip_adapter = None

    def release_controlnets(self) -> None:
        """Free the ControlNets the ranks loaded (with the next request; one that request
        names is loaded again). Each ControlNet a request names stays loaded until then."""
        self._release_controlnets = True

    def unload_lora(self, name: str) -> None:
        if name not in self.adapters:
            raise ConfigError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.adapters) or 'none'})")
        del self.adapters[name]
        del self._lora_sources[name]
        self._lora_confirmed.discard(name)

    def stream(self, prompt: str, num_chunks: int | None = None, steps: int | None = None, seed: int = 0,
               height: int | None = None, width: int | None = None, kv_window: int | None = None,
               progress: bool = False, float_frames: bool = False) -> "VideoStream":
        """Stream video frames for `prompt` from a causal video model: an iterator of frames,
        (H, W, 3) uint8 numpy arrays, produced while you consume them. `num_chunks=None`
        streams until you stop iterating (or call `.close()`), which stops every rank.
        `steps` per chunk, frame size and `kv_window` default to the model's settings;
        `float_frames` gives float32 frames in [0, 1] as decoded. The stream's `report`
        (throughput, time to first frame, per-rank busy/wait and bytes) is set when it ends."""
        from engine.runtime.video import build_stream_request

        if getattr(self.info, "kind", "image") != "video":
            raise ConfigError(f"{self.model} is an image model: stream needs a causal video model "
                              "(e.g. tiny-causal-video); use generate()")
        if self.launch == "torchrun" and num_chunks is None:
            raise ConfigError("under torchrun a stream needs num_chunks: a caller on one rank cannot stop the others")
        request = build_stream_request(self.info, self.parallel.strategy, self.parallel.world_size or 1, prompt,
                                       num_chunks, steps, seed, height, width, kv_window)
        return VideoStream(self, request, progress, float_frames)

    def open_stream(self, stream: VideoStream):
        """Start `stream`'s request on the ranks (called by VideoStream on its first frame):
        the iterator of (chunk, frames, seconds). One stream at a time, and no generate meanwhile."""
        with self._lock:
            self._check_no_open_stream()
            self._restart_if_failed()
            self._open_stream = stream
        return self._backend.stream(stream.request)

    def close_stream(self, stream: VideoStream) -> list:
        """Mark `stream` ended (the engine serves the next request); every rank's report of it."""
        if self._open_stream is stream:
            self._open_stream = None
        return list(self._backend.last_reports or [])

    def _check_no_open_stream(self) -> None:
        if self._open_stream is not None:
            raise RuntimeError("a stream is still open on this engine: exhaust it or call stream.close() "
                               "(or use `with engine.stream(...) as stream:`) before the next request")

    def _restart_if_failed(self) -> None:
        """With auto_restart, a group that failed (a rank died, or an error took it down) is
        brought back before the next request. Called with the lock held."""
        if self.auto_restart and self._respawn is not None and self._backend.closed and not self._closed:
            self._backend = self._respawn()
            self._lora_confirmed = set()  # new ranks: every adapter travels again

    def restart(self) -> None:
        """Bring a failed rank group back: new local processes or Ray actors (a torchrun job
        restarts through torchrun)."""
        if self._respawn is None:
            raise RuntimeError("restart() applies to engines whose ranks it launched (local or Ray)")
        with self._lock:
            self._backend.close()
            self._backend = self._respawn()
            self._lora_confirmed = set()  # new ranks: every adapter travels again

    def close(self) -> None:
        self._closed = True
        self._backend.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
