"""A prepared GPU check: one script that says what Tessera does on NVIDIA GPUs.

    make gpu-check                                  # a machine with NVIDIA GPUs: under 8 minutes on one H100/H200
    python -m benchmarks.gpu_check                  # the same, without make
    python -m benchmarks.gpu_check --cpu            # tiny sizes, CPU + gloo (what CI runs, so it stays working)
    python -m benchmarks.gpu_check --budget-s 300 --out outputs/gpu_check.json

Writes one JSON (default outputs/gpu_check.json) and a markdown table beside it (.md);
progress lines go to stderr. The exit code is 1 when any check failed (0 otherwise; 2 when
there is no GPU and --cpu was not given). Sections, in the order they run:

1. `environment`: torch / CUDA / NCCL / diffusers versions, the devices, TF32 settings.
2. `single_rank`: every strategy's single-rank path on the device, in bf16 and fp16 (CPU:
   float32): per model, serial (`none`) against `patch`, `patch-sync` and `pcpp` with
   `world_size=1` (they must equal it), `asg` at 1.5x the native side (one process: every
   tile and the branch; must run and stay finite), and `tpp` with one rank against `none`
   on `tiny-causal-video` (equal frames).
3. `multi_rank` (2 or more GPUs; CPU: 2 local gloo ranks): one engine per model with one rank
   per GPU (up to 8), NCCL. `patch-sync` equals serial (float32 with TF32 off, so the only
   difference is reassociation), also with CFG split and on a DiT; `patch`, `pcpp`, `asg`
   (staleness 0 equals its single-process reference, staleness 1 runs) report; `tpp`
   streams the frames of one rank. Then the measured ratios: SDXL's UNet at its published
   widths (random bf16 weights, written once to a temporary pipeline directory that every
   rank loads) at 2048^2, each strategy's denoising time against the serial run of the same
   request on rank 0 (`compare_serial`). CPU: one engine, `tiny-sdxl`'s UNet written to a
   directory the same way, serves every request at 128 px (asg at 384 px).
4. `isolated` (benchmarks/isolated.py): the real-size SDXL UNet and PixArt-Sigma (random bf16
   weights) at 1024^2, 2048^2 and 3840^2; the serial denoiser, then rank r of N = 2/4/8 alone
   on the one GPU, for `patch` and `pcpp`: a middle band (two neighbours: the most halo rows
   and boundary K/V), and the first band too where the split is uneven (it gets the extra
   rows). Per rank and step (benchmarks.isolated.measure): wall time after a synchronise, the
   time between CUDA events, the host's issue time; and here, from one more request under
   torch.profiler with CUDA activity, the GPU's kernel (busy) time: CUDA events also count the
   gaps where the GPU waits for a slower host. CPU: `tiny-sdxl` at 128 px, N = 2 (busy = ATen time).
5. `projections`: from those measurements, per (model, size, strategy, N): the measured
   compute speed-up with one device per rank (serial kernel time / the slowest rank's; and
   the same on wall time, which includes a host slower than the GPU), whether the host bounds
   the step (the GPU idles for more than a fifth of it), and a whole request (50 steps, 4
   synchronous) with the communication time of `benchmarks.costmodel` added for a hardware
   profile (default h100-nvlink): on kernel time (what a captured step would take, `graphs`)
   and on wall time (eager, as Tessera runs today), beside the cost model's FLOP projection.

Time: a budget for the whole run (`--budget-s`, default 420 s on GPUs), with a cap per section;
before each model build, measurement or engine the script estimates its cost and skips
what would not fit, recording it as skipped with the reason, so the run stays under 8 minutes.
With --cpu this process uses one thread (--threads to change it): tiny models gain nothing
from two, and on a machine shared with other jobs spinning threads slow them 100-fold.
Every section and every item inside one is wrapped: an exception is recorded with its text
and traceback and the script goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.output import write_results

PROMPT = "a red circle and a blue square"
VIDEO_MODEL = "tiny-causal-video"
SECTIONS = ("environment", "single_rank", "multi_rank", "isolated", "projections")
# A whole request in the projection: DistriFusion's setting (50 DDIM steps, 4 synchronous).
REQUEST_STEPS, REQUEST_WARMUP = 50, 4
# Bound on any collective of the multi-rank engines: a hang becomes an error (and the rest of
# the check goes on) in a minute instead of the default two.
COMM_TIMEOUT_S = 60.0
RESERVE_S = 10.0  # kept back from every section for the ones after it and for writing the results

_START = time.monotonic()


def log(message: str) -> None:
    print(f"[gpu-check {time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _json_safe(value):
    """Strict JSON: non-finite floats as strings, tuples as lists, anything else as str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.floating,)):
        return _json_safe(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# What runs where


@dataclass
class MultiJob:
    """One engine of `world` ranks and the requests it serves."""

    name: str
    model: str  # a preset, or "sdxl-dir": SDXL's UNet config (see unet_config) written to a directory
    dtype: torch.dtype
    estimate_s: float
    requests: list = field(default_factory=list)  # [MultiRequest]
    exact_tf32_off: bool = False  # float32 exactness: TF32 off in the ranks (NVIDIA_TF32_OVERRIDE=0)
    warmup: bool = False  # one unrecorded request first (CUDA context, cuDNN and allocator warm-up)
    unet_config: str = ""  # "published" (benchmarks/model_configs/sdxl-unet.json) or "tiny-sdxl"


@dataclass
class MultiRequest:
    label: str
    parallel: dict  # ParallelConfig fields
    size: int
    steps: int
    exact: bool = False  # the result must equal its serial reference
    ratio: bool = False  # a row of the measured ratios vs serial


@dataclass
class Plan:
    mode: str  # "gpu" or "cpu"
    device: str
    gpus: int
    budget_s: float
    caps: dict  # per section: the largest share of the budget it may take
    dtypes: list
    single_models: list
    single_size: int
    single_steps: int
    video_chunks: int
    video_steps: int
    iso_models: list
    iso_sizes: list
    iso_worlds: list
    iso_strategies: list
    iso_steps: int
    iso_warmup: int
    iso_dtype: torch.dtype | None
    multi_world: int
    multi_jobs: list
    tpp_world: int
    tpp_chunks: int
    tpp_steps: int
    tpp_warmup: bool
    exact_tol: float
    profile: str
    estimates: dict  # per-item cost guesses (seconds)
    # Serial GPU step guesses (s) of the isolated models by side, before anything was measured
    # (H100-class, bf16, batch 2); later sizes scale the last measured step.
    step_guess: dict = field(default_factory=dict)


def _asg_size(native: int) -> int:
    """1.5x the native side, rounded to 32 px: several overlapping tiles, cheap."""
    return int(round(native * 1.5 / 32)) * 32


def make_plan(args) -> Plan:
    if args.cpu:
        world = 2
        jobs = [MultiJob("sdxl-dir (tiny)", "sdxl-dir", torch.float32, 60.0, unet_config="tiny-sdxl", requests=[
            MultiRequest("patch-sync", dict(strategy="patch-sync", cfg_split=False), 128, 3, exact=True, ratio=True),
            MultiRequest("patch", dict(strategy="patch", warmup_steps=1, cfg_split=False), 128, 3, ratio=True),
            MultiRequest("pcpp", dict(strategy="pcpp", warmup_steps=1, cfg_split=False), 128, 3, ratio=True),
            MultiRequest("asg", dict(strategy="asg", asg_staleness=1, asg_tile_overlap=8), 384, 3, ratio=True),
        ])]  # CPU (CI): the requests the GPU run makes, less those the suite checks elsewhere
        return Plan(
            mode="cpu", device="cpu", gpus=0, budget_s=args.budget_s or 240.0,
            caps={"single_rank": 0.25, "multi_rank": 0.5, "isolated": 0.25, "projections": 0.125},
            dtypes=[torch.float32], single_models=["tiny-sdxl", "tiny-pixart"], single_size=128, single_steps=3,
            video_chunks=2, video_steps=2,
            iso_models=["tiny-sdxl"], iso_sizes=[128], iso_worlds=[2], iso_strategies=["patch", "pcpp"],
            iso_steps=3, iso_warmup=1, iso_dtype=torch.float32,
            multi_world=world, multi_jobs=jobs, tpp_world=2, tpp_chunks=3, tpp_steps=2, tpp_warmup=False, exact_tol=1e-5,
            profile=args.profile,
            estimates={"single": 10.0, "video": 8.0, "iso_build": 5.0, "tpp_job": 30.0},
            step_guess={},
        )
    gpus = torch.cuda.device_count()
    world = min(gpus, 8)
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    tiny_size, tiny_steps = 512, 6
    jobs = [
        MultiJob("tiny-sdxl float32", "tiny-sdxl", torch.float32, 45.0, exact_tf32_off=True, requests=[
            MultiRequest("patch-sync", dict(strategy="patch-sync", cfg_split=False), tiny_size, tiny_steps, exact=True),
            MultiRequest("patch-sync + cfg split", dict(strategy="patch-sync", cfg_split=True), tiny_size, tiny_steps,
                         exact=True),
            MultiRequest("patch", dict(strategy="patch", warmup_steps=2, cfg_split=False), tiny_size, tiny_steps),
            MultiRequest("pcpp", dict(strategy="pcpp", warmup_steps=2, cfg_split=False), tiny_size, tiny_steps),
            # 768 px: 16 tiles of the 256 px native size, enough for 7 tile ranks
            MultiRequest("asg staleness 0", dict(strategy="asg", asg_staleness=0, asg_tile_overlap=8), 768, tiny_steps,
                         exact=True),
            MultiRequest("asg", dict(strategy="asg", asg_staleness=1, asg_tile_overlap=8), 768, tiny_steps),
        ]),
        # the measured ratios: SDXL's UNet at its published widths, random weights
        MultiJob("sdxl (published UNet, random weights)", "sdxl-dir", half, 110.0, warmup=True,
                 unet_config="published", requests=[
                     MultiRequest("patch-sync", dict(strategy="patch-sync", cfg_split=False), 2048, 8, ratio=True),
                     MultiRequest("patch", dict(strategy="patch", warmup_steps=2, cfg_split=False), 2048, 8, ratio=True),
                     MultiRequest("pcpp", dict(strategy="pcpp", warmup_steps=2, cfg_split=False), 2048, 8, ratio=True),
                     MultiRequest("asg", dict(strategy="asg", asg_staleness=1), 2048, 8, ratio=True),
                 ]),
        MultiJob("tiny-pixart float32", "tiny-pixart", torch.float32, 35.0, exact_tf32_off=True, requests=[
            MultiRequest("patch-sync", dict(strategy="patch-sync", cfg_split=False), tiny_size, tiny_steps, exact=True),
        ]),
    ]
    return Plan(
        mode="gpu", device="cuda", gpus=gpus, budget_s=args.budget_s or 420.0,
        caps={"single_rank": 0.18, "multi_rank": 0.5, "isolated": 1.0, "projections": 0.05},
        dtypes=[torch.bfloat16, torch.float16], single_models=["tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux"],
        single_size=256, single_steps=4, video_chunks=3, video_steps=2,
        iso_models=["sdxl", "pixart-sigma"], iso_sizes=[1024, 2048, 3840], iso_worlds=[2, 4, 8],
        iso_strategies=["patch", "pcpp"], iso_steps=4, iso_warmup=1, iso_dtype=half,
        multi_world=world if world >= 2 else 0, multi_jobs=jobs,
        tpp_world=min(world, 5), tpp_chunks=8, tpp_steps=4, tpp_warmup=True, exact_tol=1e-4, profile=args.profile,
        estimates={"single": 10.0, "video": 8.0, "iso_build": 8.0, "tpp_job": 35.0},
        step_guess={("sdxl", 1024): 0.12, ("pixart-sigma", 1024): 0.12},
    )


# ---------------------------------------------------------------------------------------------
# Sections: budget, checks, failures


class Section:
    """One part of the check: its checks, skipped items, data, and a deadline."""

    def __init__(self, name: str, deadline: float):
        self.name = name
        self.deadline = deadline
        self.checks: list[dict] = []
        self.skipped: list[dict] = []
        self.data: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, label: str, estimate_s: float) -> bool:
        """Whether an item of about `estimate_s` fits in the time left; if not, it is skipped."""
        left = self.left()
        if estimate_s <= left:
            return True
        self.skip(label, f"time budget: about {estimate_s:.0f} s needed, {max(0.0, left):.0f} s left in this section")
        return False

    def skip(self, label: str, reason: str) -> None:
        log(f"{self.name}: skipped {label}: {reason}")
        self.skipped.append({"item": label, "reason": reason})

    def check(self, label: str, ok: bool, **details) -> bool:
        self.checks.append(dict(check=label, ok=bool(ok), **details))
        shown = ", ".join(f"{k}={_short(v)}" for k, v in details.items()
                          if k != "traceback" and not isinstance(v, (dict, list)))
        log(f"{self.name}: {'ok  ' if ok else 'FAIL'} {label}" + (f" ({shown})" if shown else ""))
        if not ok and details.get("traceback"):
            print(details["traceback"], file=sys.stderr, flush=True)
        return bool(ok)

    @contextlib.contextmanager
    def attempt(self, label: str):
        """Run one item; an exception becomes a failed check with its text, and the section goes on."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the check
            self.check(label, False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            _free_memory()

    @property
    def failed(self) -> bool:
        return any(not c["ok"] for c in self.checks)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) < 120 else text[:117] + "..."


def run_section(results: dict, name: str, fn, plan: Plan, skip_reason: str | None = None,
                reserve_s: float = RESERVE_S) -> None:
    record: dict = {"status": "skipped", "elapsed_s": 0.0}
    results["sections"][name] = record
    if skip_reason is not None:
        record["reason"] = skip_reason
        log(f"{name}: skipped: {skip_reason}")
        return
    left = plan.budget_s - (time.monotonic() - _START) - reserve_s
    available = min(plan.caps.get(name, 1.0) * plan.budget_s, left)
    if available <= 1.0:
        record["reason"] = f"time budget: {max(0.0, left):.0f} s left of {plan.budget_s:.0f} s"
        log(f"{name}: skipped: {record['reason']}")
        return
    log(f"{name}: start (up to {available:.0f} s)")
    section = Section(name, time.monotonic() + available)
    start = time.monotonic()
    try:
        fn(section, plan)
        record["status"] = "failed" if section.failed else "ok"
    except Exception as exc:  # noqa: BLE001
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        log(f"{name}: FAILED: {record['error']}")
        print(record["traceback"], file=sys.stderr, flush=True)
    finally:
        _free_memory()
    record.update(elapsed_s=time.monotonic() - start, budget_s=available, checks=section.checks,
                  skipped=section.skipped, **section.data)
    log(f"{name}: {record['status']} in {record['elapsed_s']:.1f} s "
        f"({sum(c['ok'] for c in section.checks)}/{len(section.checks)} checks ok, {len(section.skipped)} skipped)")


# ---------------------------------------------------------------------------------------------
# 1. environment


def environment(section: Section, plan: Plan) -> None:
    import diffusers

    env = {
        "mode": plan.mode, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env.update(
            cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
            devices=[{"name": torch.cuda.get_device_name(i),
                      "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                      "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                     for i in range(torch.cuda.device_count())],
            bf16=torch.cuda.is_bf16_supported(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
        with contextlib.suppress(Exception):
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    section.data["environment"] = env
    section.check("device available", plan.mode == "cpu" or env.get("gpus", 0) >= 1, device=plan.device)


# ---------------------------------------------------------------------------------------------
# 2. single rank


def _compare(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 of `a` against `b`; where `b` is not finite (a half-precision overflow of a
    random model), equal non-finite positions count as equal and the rest is compared."""
    from engine.metrics import rel_l2

    if a.shape != b.shape:
        return math.inf
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if finite_b.all() and finite_a.all():
        return rel_l2(a, b)
    if not np.array_equal(finite_a, finite_b) or not np.array_equal(a[~finite_a], b[~finite_b], equal_nan=True):
        return math.inf
    return rel_l2(a[finite_a], b[finite_b])


def _generate(engine, size: int, steps: int, parallel=None, compare_serial: bool = False):
    return engine.generate(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=5.0, seed=1,
                           parallel=parallel, compare_serial=compare_serial, progress=False)


def single_rank(section: Section, plan: Plan) -> None:
    from engine import Engine, ParallelConfig
    from engine.models import describe_model

    rows = []
    section.data["rows"] = rows
    for model in plan.single_models:
        for dtype in plan.dtypes:
            label = f"{model} {_dtype_name(dtype)}"
            if not section.fits(label, plan.estimates["single"]):
                continue
            tol = 1e-6 if dtype == torch.float32 else 1e-3
            with section.attempt(f"{label}: single-rank paths"):
                log(f"single_rank: {label}")
                with Engine.from_pretrained(model, device=plan.device, dtype=dtype) as engine:
                    size, steps = plan.single_size, plan.single_steps
                    ref = _generate(engine, size, steps)
                    serial = ref.latents.numpy()
                    row = {"model": model, "dtype": _dtype_name(dtype), "size": size, "steps": steps,
                           "none_denoise_s": ref.report["denoise_s"], "finite": bool(np.isfinite(serial).all())}
                    if dtype != torch.float16 or row["finite"]:
                        section.check(f"{label} none: finite latents", row["finite"])
                    else:  # random weights may overflow float16: a fact about the model, recorded
                        row["note"] = "non-finite latents in float16 (random weights); compared where finite"
                        log(f"single_rank: {label}: {row['note']}")
                    for strategy in ("patch", "patch-sync", "pcpp"):
                        out = _generate(engine, size, steps, ParallelConfig(strategy=strategy, world_size=1))
                        err = _compare(out.latents.numpy(), serial)
                        row[f"{strategy}_rel_l2"] = err
                        row[f"{strategy}_denoise_s"] = out.report["denoise_s"]
                        section.check(f"{label} {strategy} world_size=1 equals serial", err <= tol, rel_l2=err, tol=tol)
                    info = describe_model(model)
                    try:
                        from parallel.asg import asg_plan

                        asg_plan(info, ParallelConfig(strategy="asg", world_size=1), info.native_size,
                                 info.native_size, steps)
                        applicable = True
                    except Exception as exc:  # noqa: BLE001 - e.g. Flux: no spatial tiles
                        applicable = False
                        row["asg"] = f"not applicable: {exc}"
                    if applicable:
                        asg_size = _asg_size(info.native_size)
                        out = _generate(engine, asg_size, steps, ParallelConfig(strategy="asg", world_size=1))
                        latents = out.latents.numpy()
                        tiles = out.report.get("asg", {}).get("tiles")
                        row.update(asg_size=asg_size, asg_tiles=tiles, asg_denoise_s=out.report["denoise_s"])
                        section.check(f"{label} asg world_size=1 runs ({asg_size} px)",
                                      bool(np.isfinite(latents).all()) and (tiles or 0) > 1, tiles=tiles)
                    rows.append(row)
        _free_memory()
    for dtype in plan.dtypes:
        label = f"{VIDEO_MODEL} {_dtype_name(dtype)}"
        if not section.fits(label, plan.estimates["video"]):
            continue
        with section.attempt(f"{label}: tpp world_size=1"):
            log(f"single_rank: {label}")
            frames = {}
            for strategy in ("none", "tpp"):
                with Engine.from_pretrained(VIDEO_MODEL, parallel=ParallelConfig(strategy=strategy, world_size=1),
                                            device=plan.device, dtype=dtype) as engine:
                    stream = engine.stream(PROMPT, num_chunks=plan.video_chunks, steps=plan.video_steps, seed=3,
                                           float_frames=True)
                    frames[strategy] = np.stack(list(stream))
                    report = stream.report
            err = _compare(frames["tpp"], frames["none"])
            rows.append({"model": VIDEO_MODEL, "dtype": _dtype_name(dtype), "tpp_rel_l2": err,
                         "frames": int(frames["tpp"].shape[0]), "steady_fps": report.get("steady_fps")})
            section.check(f"{label} tpp world_size=1 equals none", err <= 1e-5 and bool(np.isfinite(frames["tpp"]).all()),
                          rel_l2=err, frames=int(frames["tpp"].shape[0]))


# ---------------------------------------------------------------------------------------------
# 3. several ranks


def sdxl_pipeline_dir(path: str, unet_config: str, device: str, dtype: torch.dtype) -> str:
    """An SDXL pipeline directory with random weights: the UNet of `unet_config` ("published":
    SDXL base's config from benchmarks/model_configs; "tiny-sdxl": the preset's), two 2-layer
    CLIP text encoders whose widths feed that UNet (their hidden states side by side make its
    cross-attention width, the second one's projection its pooled text input), the tiny VAE.
    Every rank loads the same weights from it (a random model built per rank would differ)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from engine.models.presets import PRESETS
    from engine.models.tiny_parts import PRESET_SEED, clip_config

    base = PRESETS["tiny-sdxl"]()  # tokenizers, VAE, scheduler
    if unet_config == "published":
        from benchmarks import costmodel

        config = dict(costmodel._load_model(costmodel.MODELS["sdxl"]).config)
    else:
        config = dict(base.unet.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    first = config["cross_attention_dim"] - pooled
    torch.manual_seed(PRESET_SEED)
    text_encoder = CLIPTextModel(clip_config(len(base.tokenizer), hidden=first))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(len(base.tokenizer_2), hidden=pooled,
                                                              projection_dim=pooled))
    with torch.device(device):  # a 2.6B-parameter UNet initialises in seconds on a GPU
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).eval()
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
                                     scheduler=base.scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path)
    del pipe, unet, base
    _free_memory()
    return path


@contextlib.contextmanager
def _environ(**values):
    """Environment variables the spawned ranks inherit (set only while they start)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _report_row(job: MultiJob, req: MultiRequest, result, world: int) -> dict:
    report = result.report
    vs = report.get("vs_serial") or {}
    ranks = report.get("per_rank") or []

    def steady(rank, key):
        steps = rank.get("per_step") or []
        return steps[-1].get(key, 0) if steps else 0

    row = {
        "job": job.name, "request": req.label, "strategy": report.get("strategy"), "world_size": world,
        "dtype": report.get("dtype"), "size": req.size, "steps": req.steps, "cfg_split": report.get("cfg_split"),
        "denoise_s": report.get("denoise_s"), "serial_denoise_s": vs.get("serial_denoise_s"),
        "latency_s": report.get("latency_s"), "decode": report.get("decode"),
        "psnr_db": vs.get("psnr_db"), "latent_rel_l2": vs.get("latent_rel_l2"),
        "max_comm_wait_s": max((r.get("comm_wait_s", 0.0) for r in ranks), default=None),
        "max_bytes_sent_last_step": max((steady(r, "bytes_sent") for r in ranks), default=None),
        "max_ops_last_step": max((steady(r, "collectives") for r in ranks), default=None),
        "max_peak_mem_bytes": max((r.get("peak_mem_bytes", 0) for r in ranks), default=None),
        "ranks_reported": len(ranks),
    }
    if row["denoise_s"] and row["serial_denoise_s"]:
        row["x_serial"] = row["serial_denoise_s"] / row["denoise_s"]
    if "asg" in report:
        row["asg"] = report["asg"]
    return row


def _run_job(section: Section, plan: Plan, job: MultiJob, rows: list, workdir: str) -> None:
    from engine import Engine, ParallelConfig

    world = plan.multi_world
    model = job.model
    if model == "sdxl-dir":
        log(f"multi_rank: writing the {job.unet_config} SDXL pipeline ({_dtype_name(job.dtype)})")
        model = sdxl_pipeline_dir(os.path.join(workdir, f"sdxl-{job.unet_config}"), job.unet_config, plan.device,
                                  job.dtype)
    env = {"NVIDIA_TF32_OVERRIDE": "0"} if job.exact_tf32_off and plan.mode == "gpu" else {}
    log(f"multi_rank: {job.name}: starting {world} ranks")
    started = time.monotonic()
    with _environ(**env):
        engine = Engine.from_pretrained(
            model, parallel=ParallelConfig(strategy="patch", world_size=world, comm_timeout_s=COMM_TIMEOUT_S),
            device=plan.device, dtype=job.dtype)
    section.data.setdefault("engine_start_s", {})[job.name] = time.monotonic() - started
    try:
        if job.warmup and job.requests:
            first = job.requests[0]
            with section.attempt(f"{job.name}: warm-up"):
                _generate(engine, first.size, 2, ParallelConfig(**first.parallel), compare_serial=True)
        per_request = max(5.0, job.estimate_s / (2 * max(1, len(job.requests))))
        for req in job.requests:
            label = f"{job.name} {req.label} x{world}"
            if req.parallel.get("cfg_split") and world % 2:
                section.skip(label, f"CFG split needs an even number of ranks, this machine has {world}")
                continue
            if not section.fits(label, per_request):
                continue
            with section.attempt(label):
                result = _generate(engine, req.size, req.steps, ParallelConfig(**req.parallel), compare_serial=True)
                row = _report_row(job, req, result, world)
                row["ratio_row"] = req.ratio
                rows.append(row)
                latents = result.latents.numpy()
                ok = row["ranks_reported"] == world
                if req.exact:
                    err = row["latent_rel_l2"]
                    section.check(f"{label} equals its serial reference", ok and err is not None and err <= plan.exact_tol,
                                  latent_rel_l2=err, tol=plan.exact_tol, x_serial=row.get("x_serial"))
                elif req.ratio and job.unet_config == "published":
                    # random weights at full width: finiteness is reported, not required
                    row["finite"] = bool(np.isfinite(latents).all())
                    section.check(f"{label} runs and reports", ok, x_serial=row.get("x_serial"),
                                  finite=row["finite"])
                else:
                    section.check(f"{label} runs and reports", ok and bool(np.isfinite(latents).all()),
                                  x_serial=row.get("x_serial"), psnr_db=row["psnr_db"])
    finally:
        engine.close()
        _free_memory()


def _tpp_job(section: Section, plan: Plan, rows: list) -> None:
    from engine import Engine, ParallelConfig

    world = plan.tpp_world
    request = dict(num_chunks=plan.tpp_chunks, steps=plan.tpp_steps, seed=3, float_frames=True)
    runs = {}
    for strategy, ranks in (("none", 1), ("tpp", world)):
        parallel = ParallelConfig(strategy=strategy, world_size=ranks, comm_timeout_s=COMM_TIMEOUT_S)
        with Engine.from_pretrained(VIDEO_MODEL, parallel=parallel, device=plan.device) as engine:
            if plan.tpp_warmup:
                list(engine.stream(PROMPT, num_chunks=2, steps=plan.tpp_steps, seed=3))
            stream = engine.stream(PROMPT, **request)
            runs[strategy] = (np.stack(list(stream)), stream.report)
    (ref, ref_report), (frames, report) = runs["none"], runs["tpp"]
    err = _compare(frames, ref)
    row = {"job": VIDEO_MODEL, "request": "tpp", "strategy": "tpp", "world_size": world, "chunks": plan.tpp_chunks,
           "steps": plan.tpp_steps, "rel_l2_vs_one_rank": err, "steady_fps": report.get("steady_fps"),
           "serial_steady_fps": ref_report.get("steady_fps"), "stage_bound_fps": report.get("stage_bound_fps"),
           "time_to_first_frame_s": report.get("time_to_first_frame_s"),
           "bytes_sent_per_rank": [r.get("bytes_sent") for r in report.get("per_rank", [])], "ratio_row": True}
    if row["steady_fps"] and row["serial_steady_fps"]:
        row["x_serial"] = row["steady_fps"] / row["serial_steady_fps"]
    rows.append(row)
    tol = plan.exact_tol
    section.check(f"tpp x{world} equals the single-rank stream", err <= tol and frames.shape == ref.shape,
                  rel_l2=err, tol=tol, x_serial=row.get("x_serial"))


def multi_rank(section: Section, plan: Plan) -> None:
    rows = []
    section.data["rows"] = rows
    section.data["world_size"] = plan.multi_world
    workdir = tempfile.mkdtemp(prefix="tessera-gpu-check-")
    try:
        jobs = list(plan.multi_jobs)
        # tiny-sdxl (exactness) first, then the stream, then the ratios, then the DiT
        order = jobs[:1] + ["tpp"] + jobs[1:]
        for job in order:
            if job == "tpp":
                label = f"tpp x{plan.tpp_world} ({VIDEO_MODEL})"
                if section.fits(label, plan.estimates["tpp_job"]):
                    with section.attempt(label):
                        _tpp_job(section, plan, rows)
                continue
            if not section.fits(job.name, job.estimate_s):
                continue
            with section.attempt(f"{job.name}: engine"):
                _run_job(section, plan, job, rows, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# 4. isolated ranks


def _iso_ranks(subject, align: int, world: int) -> list[int]:
    """The ranks to measure: a middle band (two neighbours: the most halo rows and, for pcpp,
    the most boundary K/V), and the first band too where the split is uneven (the first
    bands get the extra rows). With even bands every other rank does at most that work."""
    from parallel.patch.bands import BandPlan

    plan = BandPlan.split(*subject.latent, world, align)
    middle = world // 2
    uneven = max(plan.rows(j) for j in range(world)) > plan.rows(middle)
    return sorted({0, middle} if uneven else {middle})


@torch.no_grad()
def kernel_busy_s(subject, steps: int, request=contextlib.nullcontext) -> float:
    """Seconds per step the device spends in kernels (torch.profiler with CUDA activity), over
    one request of `steps` denoiser calls. CUDA events around a step also count the gaps in
    which the GPU waits for a slower host, so this is what a captured step (CUDA graphs)
    would cost the GPU. 0.0 where the profiler sees no device time (CPU)."""
    args, kwargs = subject.call
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = subject.device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with request():
            for _ in range(steps):
                subject.denoiser(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(subject.device)
    # Summed as the profiler's own table sums "Self CUDA time total": the device-side events
    # (kernels, copies), not user annotations, and not the CPU ops that launched them (their
    # device time is the same kernels again).
    from torch.autograd import DeviceType

    total_us = 0.0
    for entry in prof.key_averages():
        legacy = entry.device_type == DeviceType.CPU and getattr(entry, "is_legacy", False)
        device = entry.device_type == DeviceType.CUDA and not getattr(entry, "is_user_annotation", False)
        if legacy or device:
            total_us += float(entry.self_device_time_total)
    return total_us / 1e6 / steps


def _with_busy(point: dict, busy: float | None, error: str | None = None) -> dict:
    """`busy_s`: the device's kernel time per step where measured, else the step's work time
    (CPU: top-level ATen time)."""
    point["busy_source"] = "kernels (profiler)" if busy else ("work (fallback: " + (error or "no device time") + ")")
    point["busy_s"] = busy if busy else point["work_s"]
    return point


def isolated(section: Section, plan: Plan) -> None:
    from benchmarks import isolated as iso
    from parallel.config import ParallelConfig

    device = torch.device(plan.device)
    records: list[dict] = []
    section.data["records"] = records
    last_step: dict = {}  # model -> (size, measured serial step)
    threads = torch.get_num_threads()
    for size in plan.iso_sizes:
        for model in plan.iso_models:
            if model in last_step:
                prev_size, prev_step = last_step[model]
                guess = prev_step * (size / prev_size) ** 3  # attention grows with the square of the pixels
            else:
                guess = plan.step_guess.get((model, size), 0.05)
            serial_cost = plan.estimates["iso_build"] + 5 * plan.iso_steps * guess
            if not section.fits(f"{model} {size}", serial_cost):
                continue
            subject = ranks = None
            with section.attempt(f"{model} {size}: isolated"):
                log(f"isolated: {model} {size}: building (guess {guess * 1e3:.0f} ms/step)")
                subject = iso.load_subject(model, size, device, plan.iso_dtype)
                base = {"model": model, "size": size, "steps": plan.iso_steps, "threads": threads,
                        "device": str(device), "dtype": _dtype_name(subject.denoiser.dtype)}
                serial = iso.measure(subject, plan.iso_steps, steady_from=1)
                serial = _with_busy(serial, *_busy(subject, plan.iso_steps))
                records.append(dict(base, strategy="serial", world_size=1, rank=0, **serial))
                last_step[model] = (size, serial["step_s"])
                log(f"isolated: {model} {size} serial: step {serial['step_s'] * 1e3:.1f} ms, "
                    f"work {serial['work_s'] * 1e3:.1f} ms, busy {serial['busy_s'] * 1e3:.1f} ms, "
                    f"host {serial['host_s'] * 1e3:.1f} ms")
                ranks = iso.IsolatedRanks(subject)
                for strategy in plan.iso_strategies:
                    config = ParallelConfig(strategy=strategy, warmup_steps=plan.iso_warmup, pcpp_portion=0.3,
                                            cfg_split=False)
                    for world in plan.iso_worlds:
                        for rank in _iso_ranks(subject, ranks.align, world):
                            label = f"{model} {size} {strategy} rank {rank}/{world}"
                            per_step = max(serial["step_s"] * 1.3 / world, serial["host_s"] * 1.5)
                            if not section.fits(label, 1.0 + 5 * plan.iso_steps * per_step):
                                continue
                            with section.attempt(label):
                                point = ranks.measure(config, world, rank, plan.iso_steps)
                                point.pop("comm_per_step", None)
                                point = _with_busy(point, *_busy(subject, plan.iso_steps,
                                                                  lambda: ranks.request(config)))
                                records.append(dict(base, strategy=strategy, world_size=world, rank=rank,
                                                    warmup_steps=plan.iso_warmup, **point))
                                log(f"isolated: {label}: step {point['step_s'] * 1e3:.1f} ms, work "
                                    f"{point['work_s'] * 1e3:.1f} ms, busy {point['busy_s'] * 1e3:.1f} ms, "
                                    f"host {point['host_s'] * 1e3:.1f} ms, "
                                    f"{point.get('ops_per_step')} ops")
            subject = ranks = None  # the next size builds its own model: free this one first
            _free_memory()
    summary = summarize(records)
    section.data["summary"] = summary
    with contextlib.suppress(Exception):  # the benchmark's own summary, as `tessera bench --isolated` prints it
        section.data["isolated_summary"] = iso.summarize(records)
    measured = {(r["model"], r["size"]) for r in records if r["strategy"] == "serial"}
    section.check("isolated ranks measured", bool(summary), points=len(summary), serial=len(measured))
    if plan.mode == "gpu" and records:
        kernels = sum(r["busy_source"].startswith("kernels") for r in records)
        section.check("GPU kernel time measured (torch.profiler, CUDA activity)", kernels == len(records),
                      measured=kernels, of=len(records), first_fallback=next(
                          (r["busy_source"] for r in records if not r["busy_source"].startswith("kernels")), None))


def _busy(subject, steps: int, request=contextlib.nullcontext) -> tuple[float | None, str | None]:
    """(kernel seconds per step, None) or (None, why not): a profiler failure is recorded, not fatal."""
    try:
        return kernel_busy_s(subject, steps, request), None
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"


def summarize(records: list[dict]) -> list[dict]:
    """Per (model, size, strategy, N): the slowest measured rank against serial, on the
    device's busy time (kernels; CPU: ATen time) and on wall time, and its host time per step.
    Host-bound: on a GPU, the device idles for more than a fifth of the slowest rank's step
    (it waits for the host); on CPU, host time exceeds ATen time."""
    serial = {(r["model"], r["size"]): r for r in records if r["strategy"] == "serial"}
    groups: dict = {}
    for r in records:
        if r["strategy"] != "serial" and (r["model"], r["size"]) in serial:
            groups.setdefault((r["model"], r["size"], r["strategy"], r["world_size"]), []).append(r)
    rows = []
    for (model, size, strategy, world), ranks in groups.items():
        ref = serial[(model, size)]
        by_busy = max(ranks, key=lambda r: r["busy_s"])
        by_wall = max(ranks, key=lambda r: r["step_s"])
        host = max(r["host_s"] for r in ranks)
        kernels = by_wall["busy_source"].startswith("kernels")
        idle = max(0.0, 1.0 - by_wall["busy_s"] / by_wall["step_s"]) if kernels and by_wall["step_s"] > 0 else None
        rows.append({
            "model": model, "size": size, "strategy": strategy, "world_size": world,
            "ranks_measured": sorted(r["rank"] for r in ranks), "busy_source": by_busy["busy_source"],
            "serial_busy_s": ref["busy_s"], "serial_work_s": ref["work_s"], "serial_step_s": ref["step_s"],
            "serial_host_s": ref["host_s"],
            "rank_busy_s": by_busy["busy_s"], "rank_work_s": by_busy["work_s"], "rank_step_s": by_wall["step_s"],
            "rank_host_s": host,
            "compute_speedup": ref["busy_s"] / by_busy["busy_s"] if by_busy["busy_s"] > 0 else None,
            "wall_speedup": ref["step_s"] / by_wall["step_s"] if by_wall["step_s"] > 0 else None,
            "device_idle_share": idle,
            "host_bound": idle > 0.2 if idle is not None else host > by_wall["work_s"],
            "ops_per_step": max(r.get("ops_per_step", 0) for r in ranks),
            "bytes_sent_per_step": max(r.get("bytes_sent_per_step", 0) for r in ranks),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# 5. projections


def _comm_terms(costmodel, key: str, size: int, strategy: str, world: int, hw, k) -> tuple[float, float]:
    """(stale, synchronous) seconds of communication per step that the cost model adds to a
    rank's compute on `hw` (its step time minus its compute time)."""
    plan = costmodel.strategy_plan(costmodel.census(key, size), strategy, world, costmodel.MODELS[key], 0.3)
    stale, sync = costmodel.step_times(plan, world, hw, k)[:2]
    compute = plan.flops / (hw.peak_flops * k.achievable)
    return max(0.0, stale - compute), max(0.0, sync - compute)


def _request_speedup(serial_step: float, rank_step: float, comm_stale: float, comm_sync: float, stale: bool) -> float:
    steps, warmup = REQUEST_STEPS, (REQUEST_WARMUP if stale else REQUEST_STEPS)
    parallel = warmup * (rank_step + comm_sync) + (steps - warmup) * (rank_step + comm_stale)
    return steps * serial_step / parallel


def projections(section: Section, plan: Plan, summary: list[dict]) -> None:
    from benchmarks import costmodel

    hw, k = costmodel.PROFILES[plan.profile], costmodel.CALIBRATED
    rows = []
    section.data.update(rows=rows, profile=plan.profile, request_steps=REQUEST_STEPS, request_warmup=REQUEST_WARMUP)
    for s in summary:
        if section.left() < 2.0:
            section.skip(f"{s['model']} {s['size']} {s['strategy']} x{s['world_size']}", "time budget")
            continue
        row = {key: s[key] for key in ("model", "size", "strategy", "world_size", "compute_speedup", "wall_speedup",
                                       "host_bound", "rank_busy_s", "rank_step_s", "rank_host_s", "serial_busy_s")}
        stale = s["strategy"] in ("patch", "pcpp")
        comm = (0.0, 0.0)
        if s["model"] in costmodel.MODELS:
            with section.attempt(f"cost model {s['model']} {s['size']} {s['strategy']} x{s['world_size']}"):
                comm = _comm_terms(costmodel, s["model"], s["size"], s["strategy"], s["world_size"], hw, k)
                row["costmodel_flops_speedup"] = costmodel.speedup(s["model"], s["size"], s["strategy"],
                                                                   s["world_size"], hw, k)
                row["comm_source"] = "costmodel"
        else:
            row["comm_source"] = "none (not a published architecture: compute only)"
        row["comm_stale_s"], row["comm_sync_s"] = comm
        row["request_speedup_graphs"] = _request_speedup(s["serial_busy_s"], s["rank_busy_s"], *comm, stale)
        row["request_speedup_eager"] = _request_speedup(s["serial_step_s"], s["rank_step_s"], *comm, stale)
        rows.append(row)
    if plan.mode == "cpu":  # CI: keep the cost-model calls used on GPUs working
        with section.attempt("cost model (sdxl 1024, patch, 2)"):
            stale_s, sync_s = _comm_terms(costmodel, "sdxl", 1024, "patch", 2, hw, k)
            flops = costmodel.speedup("sdxl", 1024, "patch", 2, hw, k)
            section.data["costmodel_check"] = {"comm_stale_s": stale_s, "comm_sync_s": sync_s, "flops_speedup": flops}
            section.check("cost model answers (sdxl 1024, patch, 2)", stale_s >= 0 and sync_s >= stale_s and flops > 0,
                          comm_stale_s=stale_s, flops_speedup=flops)
    section.check("projections made", bool(rows), rows=len(rows))


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:{spec}}{suffix}"


def tables(results: dict) -> str:
    sections = results["sections"]
    out = [f"# Tessera GPU check ({results['mode']}): {'all checks passed' if results['ok'] else 'FAILED'}", "",
           f"{results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget. {results.get('device_summary', '')}",
           "", "| section | status | time (s) | checks ok | skipped | note |", "|---|---|---|---|---|---|"]
    for name in SECTIONS:
        s = sections.get(name, {"status": "missing"})
        checks = s.get("checks", [])
        note = s.get("reason") or s.get("error") or "; ".join(
            f"{c['check']}: {c.get('error', 'failed')}" for c in checks if not c["ok"])[:300]
        out.append(f"| {name} | {s['status']} | {s.get('elapsed_s', 0):.1f} | "
                   f"{sum(c['ok'] for c in checks)}/{len(checks)} | {len(s.get('skipped', []))} | {note or ''} |")

    rows = sections.get("single_rank", {}).get("rows", [])
    if rows:
        out += ["", "## Single rank (`world_size=1` vs serial)", "",
                "| model | dtype | none (s) | patch rel L2 | patch-sync rel L2 | pcpp rel L2 | asg (px, tiles, s) | tpp rel L2 |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            asg = r.get("asg") or (f"{r['asg_size']}, {r['asg_tiles']}, {r['asg_denoise_s']:.2f}" if "asg_size" in r else "-")
            out.append(f"| {r['model']} | {r['dtype']} | {_fmt(r.get('none_denoise_s'))} "
                       f"| {_fmt(r.get('patch_rel_l2'), '.1e')} | {_fmt(r.get('patch-sync_rel_l2'), '.1e')} "
                       f"| {_fmt(r.get('pcpp_rel_l2'), '.1e')} | {asg} | {_fmt(r.get('tpp_rel_l2'), '.1e')} |")

    rows = sections.get("multi_rank", {}).get("rows", [])
    if rows:
        out += ["", f"## Several ranks ({sections['multi_rank'].get('world_size')} ranks; ratios against the serial "
                "run of the same request on rank 0)", "",
                "| engine | request | ranks | dtype | size | steps | denoise (s) | serial (s) | x serial | PSNR (dB) "
                "| latent rel L2 | MB sent last step (max rank) | comm wait s (max rank) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["strategy"] == "tpp":
                out.append(f"| {r['job']} | tpp ({r['chunks']} chunks, fps {_fmt(r.get('steady_fps'), '.1f')} vs "
                           f"{_fmt(r.get('serial_steady_fps'), '.1f')}) | {r['world_size']} | - | - | {r['steps']} | - | - "
                           f"| {_fmt(r.get('x_serial'), '.2f', 'x')} | - | {_fmt(r.get('rel_l2_vs_one_rank'), '.1e')} | - | - |")
                continue
            mb = r.get("max_bytes_sent_last_step")
            out.append(f"| {r['job']} | {r['request']} | {r['world_size']} | {r.get('dtype')} | {r['size']} | {r['steps']} "
                       f"| {_fmt(r.get('denoise_s'))} | {_fmt(r.get('serial_denoise_s'))} "
                       f"| {_fmt(r.get('x_serial'), '.2f', 'x')} | {_fmt(r.get('psnr_db'), '.1f')} "
                       f"| {_fmt(r.get('latent_rel_l2'), '.1e')} | {_fmt(None if mb is None else mb / 1e6)} "
                       f"| {_fmt(r.get('max_comm_wait_s'), '.3f')} |")

    summary = sections.get("isolated", {}).get("summary", [])
    if summary:
        out += ["", "## Isolated ranks (rank r of N alone on one device; steady steps, medians)", "",
                "| model | size | strategy | N | ranks | serial busy ms/step | rank busy ms/step | compute speed-up "
                "| serial wall ms | rank wall ms | wall speed-up | rank host ms/step | device idle | host-bound "
                "| comm ops/step | MB sent/step |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in summary:
            out.append(f"| {s['model']} | {s['size']} | {s['strategy']} | {s['world_size']} | "
                       f"{','.join(map(str, s['ranks_measured']))} | {s['serial_busy_s'] * 1e3:.1f} | "
                       f"{s['rank_busy_s'] * 1e3:.1f} | {_fmt(s['compute_speedup'], '.2f', 'x')} | "
                       f"{s['serial_step_s'] * 1e3:.1f} | {s['rank_step_s'] * 1e3:.1f} | "
                       f"{_fmt(s['wall_speedup'], '.2f', 'x')} | {s['rank_host_s'] * 1e3:.1f} | "
                       f"{_fmt(None if s['device_idle_share'] is None else 100 * s['device_idle_share'], '.0f', '%')} | "
                       f"{'yes' if s['host_bound'] else 'no'} | {s['ops_per_step']} | {s['bytes_sent_per_step'] / 1e6:.2f} |")
        iso = sections["isolated"]
        device = (iso.get("records") or [{}])[0].get("device", "")
        out.append("")
        out.append("Busy: the device's kernel time per step (torch.profiler, CUDA activity; CPU: top-level ATen "
                   "time); wall: after synchronising; host: the time to issue the step (CPU: wall - ATen); device "
                   "idle: 1 - busy / wall of the slowest rank (host-bound above 20%); compute speed-up: serial busy "
                   "/ the slowest rank's busy. " + f"Device: {device}.")

    proj = sections.get("projections", {}).get("rows", [])
    if proj:
        p = sections["projections"]
        out += ["", f"## Projected speed-ups from these measurements ({p['profile']} communication, "
                f"{p['request_steps']} steps, {p['request_warmup']} synchronous)", "",
                "| model | size | strategy | N | measured compute speed-up | measured wall speed-up | host-bound "
                "| comm ms/step stale / sync | request, GPU time (graphs) | request, wall (eager) | cost model (FLOPs) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in proj:
            out.append(f"| {r['model']} | {r['size']} | {r['strategy']} | {r['world_size']} | "
                       f"{_fmt(r['compute_speedup'], '.2f', 'x')} | {_fmt(r['wall_speedup'], '.2f', 'x')} | "
                       f"{'yes' if r['host_bound'] else 'no'} | "
                       f"{r['comm_stale_s'] * 1e3:.2f} / {r['comm_sync_s'] * 1e3:.2f} | "
                       f"{_fmt(r['request_speedup_graphs'], '.2f', 'x')} | {_fmt(r['request_speedup_eager'], '.2f', 'x')} | "
                       f"{_fmt(r.get('costmodel_flops_speedup'), '.2f', 'x')} |")
    skipped = [(name, s) for name, sec in sections.items() for s in sec.get("skipped", [])]
    if skipped:
        out += ["", "## Skipped", ""] + [f"- {name}: {s['item']}: {s['reason']}" for name, s in skipped]
    failed = [(name, c) for name, sec in sections.items() for c in sec.get("checks", []) if not c["ok"]]
    if failed:
        out += ["", "## Failed checks", ""] + [
            f"- {name}: {c['check']}: " + (c.get("error") or ", ".join(f"{k}={_short(v)}" for k, v in c.items()
                                                                          if k not in ("check", "ok", "traceback")))
            for name, c in failed]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU with gloo ranks (CI)")
    parser.add_argument("--out", default="outputs/gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of the whole run (default 420 on GPUs, 240 with --cpu)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a subset of " + ",".join(SECTIONS))
    parser.add_argument("--profile", default="h100-nvlink", help="benchmarks.costmodel hardware profile for projections")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of this process (default: torch's; 1 with --cpu, which stays fast on a "
                             "machine shared with other jobs, where spinning threads slow tiny models 100-fold)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = args.threads or (1 if args.cpu else None)
    if threads:
        torch.set_num_threads(threads)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run `python -m benchmarks.gpu_check --cpu` for the CPU version",
              file=sys.stderr)
        return 2

    plan = make_plan(args)
    results = {"mode": plan.mode, "budget_s": plan.budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "argv": sys.argv[1:] if argv is None else list(argv), "sections": {}}
    log(f"mode {plan.mode}, device {plan.device}, {plan.gpus} GPU(s), budget {plan.budget_s:.0f} s")

    def select(name: str) -> str | None:
        return None if name in wanted else "not selected (--sections)"

    try:
        run_section(results, "environment", environment, plan, select("environment"))
        env = results["sections"]["environment"].get("environment", {})
        devices = env.get("devices") or []
        results["device_summary"] = (f"{len(devices)} x {devices[0]['name']}, torch {env.get('torch')}, "
                                     f"CUDA {env.get('cuda')}, NCCL {env.get('nccl')}" if devices else
                                     f"CPU ({env.get('cpu_count')} cores), torch {env.get('torch')}")
        run_section(results, "single_rank", single_rank, plan, select("single_rank"))
        multi_skip = select("multi_rank") or (None if plan.multi_world >= 2 else
                                              f"{plan.gpus} GPU: the multi-rank checks need 2 or more")
        run_section(results, "multi_rank", multi_rank, plan, multi_skip)
        # the projections come after the isolated measurements: keep their time back
        run_section(results, "isolated", isolated, plan, select("isolated"), reserve_s=RESERVE_S + 10.0)
        iso = results["sections"]["isolated"]
        proj_skip = select("projections") or (None if iso.get("summary") else
                                               f"no isolated measurements (isolated: {iso['status']})")
        summary = iso.get("summary") or []
        run_section(results, "projections", lambda section, p: projections(section, p, summary), plan, proj_skip,
                    reserve_s=2.0)
    except KeyboardInterrupt:
        results["interrupted"] = True
        log("interrupted: writing what was measured")
    statuses = [s["status"] for s in results["sections"].values()]
    results["elapsed_s"] = time.monotonic() - _START
    results["ok"] = "failed" not in statuses and not results.get("interrupted")
    safe = _json_safe(results)
    write_results(args.out, safe, tables(safe))
    log(f"{'all checks passed' if results['ok'] else 'FAILED'} in {results['elapsed_s']:.0f} s: "
        + ", ".join(f"{n} {s['status']}" for n, s in results["sections"].items()))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
