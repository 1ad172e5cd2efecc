"""Peer baselines for `tessera bench`, run outside the engine.

- diffusers' own context parallelism (Ulysses): `transformer.enable_parallelism(
  ContextParallelConfig(ulysses_degree=N))` on N spawned gloo ranks, for models whose
  transformer ships a `_cp_plan` (Flux, Wan, QwenImage, LTX ... here: `tiny-flux`).

Adaptation on CPU (the harness's, never the engine's): diffusers builds its device mesh for
`torch.accelerator`'s device type and picks `rank % torch.accelerator.device_count()`, which
divides by zero without an accelerator; the harness reports one device for that call only,
so the mesh lands on the CPU with gloo. The attention backend is set to "native" (PyTorch
SDPA), which supports context parallelism. Outputs are checked against the serial pipeline.
"""

from __future__ import annotations

import os
import statistics
import time

from comms.groups import free_port


def supports_ulysses(model: str) -> bool:
    from engine.models import describe_model

    info = describe_model(model)
    return info is not None and info.pipeline in ("FluxPipeline",)


def ulysses_limit(model: str) -> int:
    """Attention heads of the model's transformer: Ulysses needs the ranks to divide them."""
    from engine.models import load_pipeline

    import torch

    return load_pipeline(model, torch.device("cpu")).transformer.config.num_attention_heads


def _ulysses_rank(rank: int, world: int, port: int, threads: int, job: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from unittest import mock

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from diffusers import ContextParallelConfig

        from engine.runtime.decode import decode_latents
        from engine.latents import spatial_latents
        from engine.models import load_pipeline, pipeline_call_kwargs

        pipe = load_pipeline(job["model"], torch.device("cpu"))
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.set_attention_backend("native")
        with mock.patch("torch.accelerator.device_count", return_value=1):  # the CPU adaptation
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        times, latents = [], None
        for i in range(job["repeats"] + 1):  # the first call warms up
            dist.barrier()
            start = time.perf_counter()
            latents = pipe(prompt=job["prompt"], height=job["height"], width=job["width"],
                           num_inference_steps=job["steps"], guidance_scale=job["guidance_scale"],
                           generator=torch.Generator().manual_seed(job["seed"]), output_type="latent",
                           **pipeline_call_kwargs(pipe)).images
            if i:
                times.append(time.perf_counter() - start)
        if rank == 0:
            images = decode_latents(pipe, spatial_latents(pipe, latents, job["height"], job["width"]))
            results.put(("ok", {"latency_s": statistics.median(times), "images": images}))
    except BaseException as exc:
        results.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        dist.destroy_process_group()


def run_ulysses(model: str, world: int, job: dict, timeout_s: float = 600.0) -> dict:
    """Median denoising latency and rank 0's images of diffusers' Ulysses on `world` ranks."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world)
    port = free_port()
    procs = [ctx.Process(target=_ulysses_rank, args=(r, world, port, threads, dict(job, model=model), results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        kind, payload = results.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if kind != "ok":
        raise RuntimeError(f"diffusers Ulysses peer failed: {payload}")
    return payload
