"""Isolated ranks: what one device per rank would do, measured on one machine.

    tessera bench --isolated --models sdxl-layout,flux-layout --strategies patch,pcpp,patch-sync \\
        --worlds 2,4,8 --sizes 512 --steps 6 --warmup 2 --out outputs/isolated.json

A parallel run here shares a few cores among all its ranks, so its wall clock shows
overheads, not what N devices would do. Here rank r of an N-rank request runs alone in
this process with every thread: the same parallel layers, hooks, bands, slots, buffers
and accounting as a real rank, with each exchange served locally (`comms.isolated`; the
layers cannot tell). The serial denoiser is measured first, in the same run, with the
same threads, on the model before the parallel layers are installed.

Each point calls the denoiser `--steps` times on the arguments of a real pipeline call at
that size (captured once; timing does not depend on the values), after one unrecorded
run. Per step it records:
- wall time (on CUDA: synchronised after the step), and the time of the step's work:
  the top-level ATen operators under torch.profiler on CPU (a separate profiled run),
  the GPU time between CUDA events on CUDA;
- host time: on CPU wall minus ATen time (Python, hooks, dispatch, bookkeeping: what a
  captured step would not pay); on CUDA the time the host takes to issue the step;
- the communication operations and bytes the real rank would issue (its CommStats).
Steady steps are the stale ones (patch, pcpp) or every step after the first (patch-sync).

With `--compile` every point (serial included) is measured twice in the same run, eagerly
and under torch.compile (`ParallelConfig.compile`, inductor); the compiled rows add the
graph breaks dynamo met while compiling them, split into those at a bucket launch or a
wait (the communication, by design) and any other (should be none), and the compiled
table puts each compiled step beside its eager one. Compiled steady steps start one step
later (the first bucketed step runs eagerly): give `--steps` at least `--warmup` + 3.

Models: any engine model or preset (the denoiser's arguments come from one pipeline
call), or a published architecture from `benchmarks/model_configs` with random weights
(`sdxl`, `pixart-sigma`, `sd3-medium`, `flux1-dev`; for GPUs: they are large).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from benchmarks.output import write_results

STEP_MARK = "tessera.isolated.step"
HEADER = (
    "| model | size | strategy | ranks | slowest rank step (ms) | serial step (ms) | compute speed-up, 1 device/rank "
    "| host ms/step (slowest rank) | serial host ms/step | host vs serial | comm ops/step | MB sent/step "
    "| ATen ops/step (serial) | of which kernels (serial) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


@dataclass
class Subject:
    """A denoiser ready to measure: its call arguments at one size and its band geometry."""

    name: str
    holder: object  # has .unet or .transformer: what parallel.patch.backbones.backbone_of takes
    denoiser: torch.nn.Module
    call: tuple  # (args, kwargs) of one denoiser call
    latent: tuple  # (rows, cols) of the latent
    device: torch.device


def _to(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def capture_call(pipe, height: int, width: int, guidance: float = 5.0) -> tuple:
    """The denoiser's (args, kwargs) in the first step of a real pipeline call at this size."""
    from engine.models import denoiser_of, pipeline_call_kwargs

    captured = []
    handle = denoiser_of(pipe).register_forward_pre_hook(
        lambda module, args, kwargs: captured.append((args, dict(kwargs))) if not captured else None,
        with_kwargs=True, prepend=True)
    try:
        pipe(prompt="a red circle and a blue square", height=height, width=width, num_inference_steps=1,
             guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="latent",
             **pipeline_call_kwargs(pipe))
    finally:
        handle.remove()
    return captured[0]


def load_subject(name: str, size: int, device: torch.device, dtype: torch.dtype | None = None) -> Subject:
    """An engine model/preset (arguments from a real pipeline call) or a published
    architecture from benchmarks/model_configs with random weights."""
    from benchmarks import costmodel
    from engine.models import default_dtype, denoiser_of, info_from_pipeline, load_pipeline

    dtype = dtype or default_dtype(device)
    if name in costmodel.MODELS:
        spec = costmodel.MODELS[name]
        meta = costmodel._load_model(spec)
        with torch.device(device):
            model = type(meta)(**meta.config).to(dtype).eval()
        h = w = size // spec.vae_factor
        args, kwargs = costmodel._inputs(spec, model, h, w)
        call = (tuple(_to(a, device, dtype) for a in args), _to(kwargs, device, dtype))
        holder = SimpleNamespace(unet=model) if spec.unet else SimpleNamespace(transformer=model)
        return Subject(name, holder, model, call, (h, w), device)
    pipe = load_pipeline(name, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    vae = info_from_pipeline(name, pipe).vae_scale_factor
    with torch.no_grad():
        call = capture_call(pipe, size, size)
    return Subject(name, pipe, denoiser_of(pipe), call, (size // vae, size // vae), device)


# Top-level operators that only make views or metadata (or allocate): no kernel on a GPU.
NO_KERNEL_OPS = frozenset(
    "aten::" + name for name in (
        "view", "_unsafe_view", "slice", "select", "narrow", "reshape", "unsqueeze", "squeeze", "transpose",
        "permute", "expand", "as_strided", "detach", "alias", "t", "unflatten", "flatten", "split", "chunk",
        "unbind", "empty", "empty_like", "empty_strided", "lift_fresh", "view_as", "expand_as", "split_with_sizes",
    )
)


def _top_level_aten(prof) -> tuple[list[float], list[int], list[int]]:
    """Per step mark: the seconds spent inside outermost ATen operators, their count, and
    the count of those that run a kernel (on a GPU each is a dispatch plus a launch; views
    and allocations launch nothing)."""
    events = prof.events()

    def outermost(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    marks = sorted((e for e in events if e.name == STEP_MARK), key=lambda e: e.time_range.start)
    ops = [e for e in events if e.name.startswith("aten::") and outermost(e)]
    seconds, counts, kernels = [], [], []
    for m in marks:
        inside = [o for o in ops if m.time_range.start <= o.time_range.start and o.time_range.end <= m.time_range.end]
        seconds.append(sum(o.time_range.elapsed_us() for o in inside) / 1e6)
        counts.append(len(inside))
        kernels.append(sum(o.name not in NO_KERNEL_OPS for o in inside))
    return seconds, counts, kernels


def _run_steps(subject: Subject, steps: int, request, profile: bool = False) -> list[dict]:
    """One request of `steps` denoiser calls (`request` frames it: a context manager);
    per step: wall_s, issue_s (host time to issue it) and, on CUDA, gpu_s."""
    args, kwargs = subject.call
    cuda = subject.device.type == "cuda"
    out = []
    with request():
        for _ in range(steps):
            start_event = end_event = None
            if cuda:
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
            t0 = time.perf_counter()
            if profile:
                with torch.profiler.record_function(STEP_MARK):
                    subject.denoiser(*args, **kwargs)
            else:
                subject.denoiser(*args, **kwargs)
            t1 = time.perf_counter()
            if cuda:
                end_event.record()
                torch.cuda.synchronize(subject.device)  # the benchmark's own sync, never the engine's
            out.append({"wall_s": time.perf_counter() - t0, "issue_s": t1 - t0, "events": (start_event, end_event)})
    for step in out:
        start, end = step.pop("events")
        if cuda:
            step["gpu_s"] = start.elapsed_time(end) / 1000.0
    return out


@torch.no_grad()
def measure(subject: Subject, steps: int, steady_from: int, request=contextlib.nullcontext) -> dict:
    """One unrecorded request, one timed request and one profiled request (ATen time on
    CPU, and the count of top-level ATen operators per step everywhere).

    Host time on CPU is bracketed: the profiler adds its own cost to every operator, partly
    inside the operators' recorded time and partly outside, so the timed wall minus the
    profiled ATen time is a lower bound (`host_low_s`) and the profiled wall minus it an
    upper bound (`host_s`, the one reported and fed to the cost model: the conservative one)."""
    _run_steps(subject, steps, request)
    timed = _run_steps(subject, steps, request)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = _run_steps(subject, steps, request, profile=True)
    aten_s, aten_ops, kernel_ops = _top_level_aten(prof)
    if subject.device.type == "cuda":
        work = [s["gpu_s"] for s in timed]
        host = low = [s["issue_s"] for s in timed]
    else:
        work = aten_s
        host = [max(0.0, p["wall_s"] - a) for p, a in zip(profiled, work)]
        low = [max(0.0, t["wall_s"] - a) for t, a in zip(timed, work)]
    steady = slice(steady_from, steps)
    return {
        "step_s": statistics.median(s["wall_s"] for s in timed[steady]),
        "work_s": statistics.median(work[steady]),
        "host_s": statistics.median(host[steady]),
        "host_low_s": statistics.median(low[steady]),
        "aten_ops_per_step": int(statistics.median(aten_ops[steady])),
        "kernel_ops_per_step": int(statistics.median(kernel_ops[steady])),
        "per_step_wall_s": [s["wall_s"] for s in timed],
    }


# Where a graph break of a compiled denoiser may be: the opaque calls of the exchange.
COMM_BREAK_FUNCTIONS = ("_launch", "wait", "_fetch", "_run", "_all_gather", "_neighbours")


def compile_breaks() -> dict:
    """Dynamo's graph breaks and graphs since the counters were last cleared."""
    from torch._dynamo.utils import counters

    total = comm = 0
    for reason, n in counters["graph_break"].items():
        total += n
        skipped = re.search(r"<function (\S+) at", reason)  # "Skip inlining ... <function Bucket.wait at 0x..>"
        if skipped and skipped.group(1).rsplit(".", 1)[-1] in COMM_BREAK_FUNCTIONS:
            comm += n
    return {"graph_breaks": total, "graph_breaks_outside_comms": total - comm,
            "graphs": int(counters["stats"].get("unique_graphs", 0))}


class IsolatedRanks:
    """One model with the parallel layers installed once, moved through rank positions."""

    def __init__(self, subject: Subject, replay_dir: str | None = None):
        from comms import CommStats, Topology
        from comms.isolated import exchange_factory
        from parallel.patch.compiled import install_compiled
        from parallel.patch.context import PatchContext
        from parallel.patch.backbones import backbone_of

        self.subject = subject
        self.stats = CommStats()
        backbone = backbone_of(subject.holder)
        self.align = backbone.align
        self.ctx = PatchContext(Topology(0, 1, 0, subject.device), self.stats,
                                make_exchange=exchange_factory(replay_dir, isolated=True))
        backbone.install(subject.holder, self.ctx)
        install_compiled(subject.denoiser, self.ctx)  # eager unless a request asks to compile

    def place(self, world: int, rank: int) -> None:
        """Act as rank `rank` of `world` from now on."""
        from comms import Topology

        self.ctx.rebind(Topology(rank, world, 0, self.subject.device, world=None,
                                 cfg_groups=[None, None] if world % 2 == 0 else []))

    @contextlib.contextmanager
    def request(self, config, cfg_split: bool = False):
        """Frame denoiser calls as one request of `config` (as the engine's runtime does)."""
        self.stats.reset()
        self.ctx.use_compile(config.compile)
        self.ctx.begin_request(config, *self.subject.latent, self.align, cfg_split)
        try:
            yield
        finally:
            self.ctx.end_request()
            self.ctx.use_compile(False)

    def measure_serial(self, steps: int, compiled: bool) -> dict:
        """The model without a row split (the parallel layers behave as the originals)."""
        from torch._dynamo.utils import counters

        @contextlib.contextmanager
        def request():
            self.ctx.use_compile(compiled)
            try:
                yield
            finally:
                self.ctx.use_compile(False)

        counters.clear()
        out = measure(self.subject, steps, steady_from=1, request=request)
        return dict(out, compiled=compiled, **(compile_breaks() if compiled else {}))

    def measure(self, config, world: int, rank: int, steps: int, cfg_split: bool = False) -> dict:
        from torch._dynamo.utils import counters

        from parallel.registry import strategy_of

        self.place(world, rank)
        # the first stale step runs slot by slot and records the buckets (comms.buckets);
        # compiled, the first bucketed step runs eagerly too (parallel.patch.compiled)
        steady_from = strategy_of(config).steady_from(config.warmup_steps, compiled=config.compile)
        if steady_from >= steps:
            raise ValueError(f"{steps} steps leave no steady step after {steady_from}")
        counters.clear()
        out = measure(self.subject, steps, steady_from, lambda: self.request(config, cfg_split))
        out["compiled"] = config.compile
        if config.compile:
            out.update(compile_breaks())
        per_step = self.stats.per_step()
        last = per_step[-1]  # the profiled request's last step: a steady one
        out.update(ops_per_step=last["collectives"], bytes_sent_per_step=last["bytes_sent"],
                   bytes_received_per_step=last["bytes_received"], comm_per_step=per_step)
        return out


def rank_positions(world: int, which: str) -> list[int]:
    """The ranks measured: all, the first only, or the first, a middle one and the last (edge
    bands have one neighbour, middle ones two; uneven splits give the first bands more rows)."""
    if which == "all":
        return list(range(world))
    if which == "first":
        return [0]
    return sorted({0, world // 2, world - 1})


def sweep(models, sizes, strategies, worlds, steps, warmup, ranks="edges", device=None, dtype=None,
          portion=0.3, log=print, compile_too: bool = False) -> list[dict]:
    """Serial and isolated ranks for every point; one record per (serial | rank) measurement."""
    from comms.groups import local_device
    from parallel.config import ParallelConfig

    device = torch.device(device) if device is not None else local_device(0)
    threads = torch.get_num_threads()
    records = []
    for model in models:
        for size in sizes:
            subject = load_subject(model, size, device, dtype)
            base = {"model": model, "size": size, "steps": steps, "threads": threads, "device": str(device),
                    "dtype": str(subject.denoiser.dtype).replace("torch.", "")}
            serial = measure(subject, steps, steady_from=1)
            records.append(dict(base, strategy="serial", world_size=1, rank=0, compiled=False, **serial))
            log(f"{model} {size}: serial step {serial['step_s'] * 1e3:.1f} ms, host {serial['host_s'] * 1e3:.1f} ms")
            isolated = IsolatedRanks(subject)
            modes = (False, True) if compile_too else (False,)
            if compile_too:
                point = isolated.measure_serial(steps, compiled=True)
                records.append(dict(base, strategy="serial", world_size=1, rank=0, **point))
                log(f"{model} {size}: serial compiled step {point['step_s'] * 1e3:.1f} ms, "
                    f"{point['graph_breaks']} graph breaks")
            for strategy in strategies:
                for compiled in modes:
                    config = ParallelConfig(strategy=strategy, warmup_steps=warmup, pcpp_portion=portion,
                                            cfg_split=False, compile=compiled)
                    for world in worlds:
                        for rank in rank_positions(world, ranks):
                            point = isolated.measure(config, world, rank, steps)
                            records.append(dict(base, strategy=strategy, world_size=world, rank=rank,
                                                warmup_steps=warmup, **point))
                            breaks = (f", {point['graph_breaks']} graph breaks "
                                      f"({point['graph_breaks_outside_comms']} outside comms)" if compiled else "")
                            log(f"{model} {size} {strategy}{' compiled' if compiled else ''} rank {rank}/{world}: "
                                f"step {point['step_s'] * 1e3:.1f} ms, host {point['host_s'] * 1e3:.1f} ms, "
                                f"{point['ops_per_step']} ops{breaks}")
            del isolated, subject
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per (model, size, strategy, world): the slowest measured rank against serial."""
    serial = {(r["model"], r["size"]): r for r in records if r["strategy"] == "serial" and not r.get("compiled")}
    groups: dict = {}
    for r in records:
        if r["strategy"] != "serial" and not r.get("compiled"):
            groups.setdefault((r["model"], r["size"], r["strategy"], r["world_size"]), []).append(r)
    rows = []
    for (model, size, strategy, world), ranks in groups.items():
        slowest = max(ranks, key=lambda r: r["step_s"])
        ref = serial[(model, size)]
        host = max(r["host_s"] for r in ranks)
        rows.append({
            "model": model, "size": size, "strategy": strategy, "world_size": world,
            "slowest_rank": slowest["rank"], "slowest_step_s": slowest["step_s"], "serial_step_s": ref["step_s"],
            "compute_speedup": ref["step_s"] / slowest["step_s"],
            "host_s": host, "serial_host_s": ref["host_s"], "host_vs_serial": host / ref["host_s"] if ref["host_s"] else None,
            "aten_ops_per_step": max(r["aten_ops_per_step"] for r in ranks),
            "serial_aten_ops_per_step": ref["aten_ops_per_step"],
            "kernel_ops_per_step": max(r["kernel_ops_per_step"] for r in ranks),
            "serial_kernel_ops_per_step": ref["kernel_ops_per_step"],
            "ops_per_step": max(r["ops_per_step"] for r in ranks),
            "bytes_sent_per_step": max(r["bytes_sent_per_step"] for r in ranks),
        })
    return rows


def summarize_compiled(records: list[dict]) -> list[dict]:
    """Per (model, size, strategy, world) measured compiled: its slowest rank's compiled
    step against the same ranks' eager steps of the same run, and the graph breaks."""
    eager, compiled = {}, {}
    for r in records:
        key = (r["model"], r["size"], r["strategy"], r["world_size"])
        (compiled if r.get("compiled") else eager).setdefault(key, []).append(r)
    rows = []
    for key, ranks in compiled.items():
        slowest = max(ranks, key=lambda r: r["step_s"])
        base = max(eager.get(key, []), key=lambda r: r["step_s"], default=None)
        rows.append({
            "model": key[0], "size": key[1], "strategy": key[2], "world_size": key[3],
            "compiled_step_s": slowest["step_s"], "eager_step_s": base["step_s"] if base else None,
            "compiled_vs_eager": base["step_s"] / slowest["step_s"] if base else None,
            "compiled_host_s": max(r["host_s"] for r in ranks),
            "eager_host_s": max(r["host_s"] for r in eager[key]) if key in eager else None,
            "graph_breaks": max(r["graph_breaks"] for r in ranks),
            "graph_breaks_outside_comms": max(r["graph_breaks_outside_comms"] for r in ranks),
            "graphs": max(r["graphs"] for r in ranks),
        })
    return rows


def compiled_table(rows: list[dict]) -> str:
    lines = ["| model | size | strategy | ranks | eager step (ms) | compiled step (ms) | speed-up of compile "
             "| eager host ms | compiled host ms | graph breaks (outside comms) | graphs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ms(v):
            return "-" if v is None else f"{v * 1e3:.1f}"
        ratio = "-" if r["compiled_vs_eager"] is None else f"{r['compiled_vs_eager']:.2f}x"
        lines.append(f"| {r['model']} | {r['size']} | {r['strategy']} | {r['world_size']} | {ms(r['eager_step_s'])} "
                     f"| {ms(r['compiled_step_s'])} | {ratio} | {ms(r['eager_host_s'])} | {ms(r['compiled_host_s'])} "
                     f"| {r['graph_breaks']} ({r['graph_breaks_outside_comms']}) | {r['graphs']} |")
    return "\n".join(lines) + "\n\nGraph breaks and graphs: counted by dynamo while compiling the point (a point " \
        "whose shapes were compiled before counts only its recompiles); 'serial' is the model without a row split.\n"


def table(summary: list[dict], records: list[dict]) -> str:
    lines = [HEADER]
    for s in summary:
        ratio = "-" if s["host_vs_serial"] is None else f"{s['host_vs_serial']:.2f}x"
        lines.append(
            f"| {s['model']} | {s['size']} | {s['strategy']} | {s['world_size']} | {s['slowest_step_s'] * 1e3:.1f} "
            f"| {s['serial_step_s'] * 1e3:.1f} | {s['compute_speedup']:.2f}x | {s['host_s'] * 1e3:.1f} "
            f"| {s['serial_host_s'] * 1e3:.1f} | {ratio} | {s['ops_per_step']} | {s['bytes_sent_per_step'] / 1e6:.2f} "
            f"| {s['aten_ops_per_step']} ({s['serial_aten_ops_per_step']}) "
            f"| {s['kernel_ops_per_step']} ({s['serial_kernel_ops_per_step']}) |")
    if records:
        r = records[0]
        lines.append(f"\nIsolated ranks: one rank alone with {r['threads']} threads on {r['device']} ({r['dtype']}), "
                     f"{r['steps']} denoiser calls per request; steady steps only. Host = "
                     + ("the profiled wall - top-level ATen time (torch.profiler), an upper bound." if r["device"] == "cpu" else
                        "time to issue a step; step = wall after synchronising."))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tessera bench --isolated", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sdxl-layout,flux-layout")
    parser.add_argument("--strategies", default="patch,pcpp,patch-sync")
    parser.add_argument("--worlds", default="2,4,8")
    parser.add_argument("--sizes", default="512")
    parser.add_argument("--steps", type=int, default=6, help="denoiser calls per request")
    parser.add_argument("--warmup", type=int, default=2, help="synchronous steps of the stale strategies")
    parser.add_argument("--pcpp-portion", type=float, default=0.3)
    parser.add_argument("--ranks", choices=("edges", "all", "first"), default="edges",
                        help="measure the first, a middle and the last rank (edges), every rank, or rank 0 only")
    parser.add_argument("--device", default=None, help="default: the local GPU if any, else cpu")
    parser.add_argument("--compile", action="store_true",
                        help="also measure every point under torch.compile (slow: inductor compiles each shape)")
    parser.add_argument("--out", default="outputs/isolated.json")
    args = parser.parse_args(argv)
    from parallel.config import PATCH_STRATEGIES, ConfigError
    from parallel.registry import strategy_of

    strategies = [s for s in args.strategies.split(",") if s]
    for s in strategies:
        if not strategy_of(s).splits_rows:
            raise ConfigError(f"--isolated measures the patch strategies ({', '.join(PATCH_STRATEGIES)}); got {s!r}")
    if args.steps <= args.warmup + (2 if args.compile else 0):
        raise ConfigError(f"--steps {args.steps} must exceed --warmup {args.warmup}"
                          + (" by at least 3 with --compile" if args.compile else "") + " to leave stale steps")
    records = sweep([m for m in args.models.split(",") if m], [int(s) for s in args.sizes.split(",") if s],
                    strategies, [int(w) for w in args.worlds.split(",") if w], args.steps, args.warmup, args.ranks,
                    args.device, portion=args.pcpp_portion, log=lambda line: print(line, file=sys.stderr, flush=True),
                    compile_too=args.compile)
    summary = summarize(records)
    results = {"records": records, "summary": summary}
    text = table(summary, records)
    if args.compile:
        results["compiled"] = summarize_compiled(records)
        text += "\n" + compiled_table(results["compiled"])
    write_results(args.out, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
