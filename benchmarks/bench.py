"""`tessera bench`: strategy x world size x resolution x model, measured on this machine.

    tessera bench --models tiny-sd,tiny-flux --strategies patch,pcpp,patch-sync --worlds 2,4 \\
        --sizes 256 --steps 8 --repeats 2 --peers ulysses --out outputs/bench.json
    tessera bench --isolated ...   # each rank alone with the whole machine (benchmarks/isolated.py)

For every point: the median denoising time over `--repeats` runs after one warm-up, and from
the last run each rank's compute time, communication wait, bytes sent/received per step and
peak memory; fidelity (PSNR, relative L2) against the serial output of the same seed.

Baselines in the same run: serial diffusers (strategy none, one process with every core:
every speed-up is taken against it) and, where the model supports it, diffusers' own context
parallelism (Ulysses) on the same number of ranks (`benchmarks/peers.py`, which says how it
is adapted to CPU). Parallel ranks share the machine's cores (cores / ranks threads each):
the table gives both the ratio and the core count.

Writes JSON (one record per point, with the machine and versions), a markdown table next to
it, and PNG plots (speed-up vs world size, bytes per step, fidelity) in the same folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

from benchmarks.output import write_results

HEADER = ("| model | size | strategy | ranks | median denoise (s) | x serial | comm wait % (max rank) "
          "| MB/step sent (max rank) | peak MB (max rank) | PSNR vs serial (dB) | rel L2 |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def machine() -> dict:
    import diffusers
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def _engine_point(engine, strategy: str, size: int, args, serial_images=None) -> dict:
    import numpy as np

    from engine import ParallelConfig
    from engine.metrics import compare

    kwargs = dict(height=size, width=size, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  seed=args.seed, progress=False)
    parallel = None if strategy == "none" else ParallelConfig(strategy=strategy, warmup_steps=args.warmup,
                                                              cfg_split=args.cfg_split)
    times, result = [], None
    for i in range(args.repeats + 1):
        result = engine.generate(args.prompt, parallel=parallel, **kwargs)
        if i:
            times.append(result.report["denoise_s"])
    report = result.report
    ranks = report["per_rank"]
    images = np.stack([np.asarray(im) for im in result.images])
    record = {
        "strategy": strategy, "ranks": report["world_size"], "median_denoise_s": statistics.median(times),
        "denoise_s_runs": times,
        "per_rank": [{"rank": r["rank"], "compute_s": r["compute_s"], "comm_wait_s": r["comm_wait_s"],
                      "bytes_sent_per_step": r["bytes_sent"] / args.steps,
                      "bytes_received_per_step": r["bytes_received"] / args.steps,
                      "peak_mem_bytes": r["peak_mem_bytes"]} for r in ranks],
    }
    if serial_images is not None:
        record.update(compare(images, serial_images))
    return record, images


def _peer_point(model: str, world: int, size: int, args, serial_images) -> dict:
    import numpy as np

    from benchmarks.peers import run_ulysses
    from engine.metrics import compare

    job = dict(prompt=args.prompt, height=size, width=size, steps=args.steps, guidance_scale=args.guidance,
               seed=args.seed, repeats=args.repeats)
    from benchmarks.peers import ulysses_limit

    limit = ulysses_limit(model)
    if world > limit or limit % world:
        raise RuntimeError(f"Ulysses splits attention heads: {model} has {limit}, which {world} ranks do not divide")
    out = run_ulysses(model, world, job)
    record = {"strategy": "diffusers-ulysses", "ranks": world, "median_denoise_s": out["latency_s"],
              "per_rank": [], "adaptation": "torch.accelerator.device_count reported as 1 for enable_parallelism "
                                            "(mesh on CPU/gloo); attention backend 'native'"}
    record.update(compare(np.asarray(out["images"]), serial_images))
    return record


def sweep(args) -> list:
    from tqdm import tqdm

    from engine import Engine, ParallelConfig
    from benchmarks.peers import supports_ulysses

    models = [m for m in args.models.split(",") if m]
    strategies = [s for s in args.strategies.split(",") if s]
    worlds = [int(w) for w in args.worlds.split(",") if w]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    peers = [p for p in args.peers.split(",") if p]
    points = sum(len(sizes) * (1 + len(worlds) * (len(strategies) + ("ulysses" in peers and supports_ulysses(m))))
                 for m in models)
    bar = tqdm(total=points, desc="bench", unit="point", file=sys.stderr)
    records, cores = [], os.cpu_count() or 1
    for model in models:
        serial_images, serial_s = {}, {}
        with Engine.from_pretrained(model) as serial:
            for size in sizes:
                rec, serial_images[size] = _engine_point(serial, "none", size, args)
                serial_s[size] = rec["median_denoise_s"]
                records.append(dict(rec, model=model, size=size, speedup=1.0, threads_per_rank=cores))
                bar.update()
        for world in worlds:
            with Engine.from_pretrained(model, parallel=ParallelConfig(strategy=strategies[0], world_size=world)) as eng:
                for size in sizes:
                    for strategy in strategies:
                        bar.set_postfix_str(f"{model} {size} {strategy} x{world}")
                        try:
                            rec, _ = _engine_point(eng, strategy, size, args, serial_images[size])
                        except Exception as exc:  # e.g. more ranks than bands at this size
                            rec = {"strategy": strategy, "ranks": world, "skipped": str(exc).splitlines()[0]}
                        if "median_denoise_s" in rec:
                            rec["speedup"] = serial_s[size] / rec["median_denoise_s"]
                        records.append(dict(rec, model=model, size=size, threads_per_rank=max(1, cores // world)))
                        bar.update()
            if "ulysses" in peers and supports_ulysses(model):
                for size in sizes:
                    bar.set_postfix_str(f"{model} {size} diffusers-ulysses x{world}")
                    try:
                        rec = _peer_point(model, world, size, args, serial_images[size])
                        rec["speedup"] = serial_s[size] / rec["median_denoise_s"]
                    except Exception as exc:
                        rec = {"strategy": "diffusers-ulysses", "ranks": world, "skipped": str(exc).splitlines()[0]}
                    records.append(dict(rec, model=model, size=size, threads_per_rank=max(1, cores // world)))
                    bar.update()
    bar.close()
    info = machine()
    for r in records:
        r.update(machine=info, steps=args.steps, repeats=args.repeats, cores=cores)
    return records


def table(records: list) -> str:
    rows = [HEADER]
    for r in records:
        if "skipped" in r:
            rows.append(f"| {r['model']} | {r['size']} | {r['strategy']} | {r['ranks']} | skipped: {r['skipped']} "
                        "| | | | | | |")
            continue
        ranks = r["per_rank"]
        wait = max((p["comm_wait_s"] / max(1e-9, p["compute_s"] + p["comm_wait_s"]) for p in ranks), default=None)
        sent = max((p["bytes_sent_per_step"] for p in ranks), default=None)
        peak = max((p["peak_mem_bytes"] for p in ranks), default=None)
        psnr = r.get("psnr_db")
        rows.append(
            f"| {r['model']} | {r['size']} | {r['strategy']} | {r['ranks']} | {r['median_denoise_s']:.2f} "
            f"| {r['speedup']:.2f} | {'-' if wait is None else '%.0f' % (100 * wait)} "
            f"| {'-' if sent is None else '%.2f' % (sent / 1e6)} | {'-' if peak is None else '%.0f' % (peak / 1e6)} "
            f"| {'-' if psnr is None else ('inf' if psnr == float('inf') else '%.1f' % psnr)} "
            f"| {'-' if 'rel_l2' not in r else '%.1e' % r['rel_l2']} |")
    cores = records[0]["cores"] if records else "?"
    rows.append(f"\nSerial: one process with all {cores} cores; a parallel run's ranks share them "
                f"(cores / ranks threads each). Machine: {records[0]['machine']['processor'] if records else '?'}.")
    return "\n".join(rows) + "\n"


def plots(records: list, out: str) -> list:
    from benchmarks.plots import line_chart

    base = os.path.splitext(out)[0]
    written = []
    keys = sorted({(r["model"], r["size"]) for r in records})
    for model, size in keys:
        mine = [r for r in records if r["model"] == model and r["size"] == size and "skipped" not in r]
        strategies = sorted({r["strategy"] for r in mine if r["strategy"] != "none"})
        speed = {s: sorted((r["ranks"], r["speedup"]) for r in mine if r["strategy"] == s) for s in strategies}
        speed["ideal"] = sorted({(r["ranks"], float(r["ranks"])) for r in mine if r["strategy"] != "none"})
        sent = {s: sorted((r["ranks"], max(p["bytes_sent_per_step"] for p in r["per_rank"]) / 1e6)
                          for r in mine if r["strategy"] == s and r["per_rank"]) for s in strategies}
        fid = {s: sorted((r["ranks"], min(r.get("psnr_db", 99.0), 99.0)) for r in mine if r["strategy"] == s)
               for s in strategies}
        tag = f"{base}_{model}_{size}"
        written += [
            line_chart(f"{tag}_speedup.png", f"{model} {size}px: speed-up vs serial", "ranks", "x serial", speed),
            line_chart(f"{tag}_bytes.png", f"{model} {size}px: MB sent per step (max rank)", "ranks", "MB", sent),
            line_chart(f"{tag}_psnr.png", f"{model} {size}px: PSNR vs serial (99 = identical)", "ranks", "dB", fid),
        ]
    return written


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--isolated" in argv:  # one rank at a time with the whole machine: benchmarks/isolated.py
        from benchmarks.isolated import main as isolated_main

        return isolated_main([a for a in argv if a != "--isolated"])
    parser = argparse.ArgumentParser(prog="tessera bench", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-sd,tiny-flux")
    parser.add_argument("--strategies", default="patch,pcpp,patch-sync")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--sizes", default="256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of the stale strategies")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--cfg-split", action="store_true",
                        help="put the CFG halves on two rank groups (default off: the strategy splits the latent)")
    parser.add_argument("--peers", default="ulysses", help="comma-separated peers to run where supported ('' for none)")
    parser.add_argument("--out", default="outputs/bench.json")
    args = parser.parse_args(argv)
    from parallel.config import PATCH_STRATEGIES, ConfigError
    from parallel.registry import strategy_of

    for s in args.strategies.split(","):
        if not strategy_of(s).splits_rows:
            raise ConfigError(f"bench sweeps the patch strategies ({', '.join(PATCH_STRATEGIES)}); got {s!r}")
    records = sweep(args)
    write_results(args.out, records, table(records))
    for path in plots(records, args.out):
        print(f"plot: {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
