"""Streaming throughput: tpp over several rank counts vs the single-rank stream, in one run.

    python -m benchmarks.stream --chunks 16 --steps 4 --size 128 --worlds 2,3,5

For each configuration (1 rank first, the baseline), one warm-up stream of 2 chunks, then the
measured stream: time to first frame, steady-state frames/s (after the first chunk), the
stage-bound frames/s (frames / the busiest rank's busy time: what the pipeline reaches when
every stage has a device of its own), per-rank busy/wait fractions and bytes, and frame
equality with the single-rank stream. Ratios are taken against the single-rank run of the
same invocation. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks.output import write_results

HEADER = ("| ranks | steps per rank | first frame (s) | steady fps | x serial | stage-bound fps | x serial "
          "| busy % per rank | MB sent per rank | vs serial rel L2 |\n|---|---|---|---|---|---|---|---|---|---|")


def measure(world: int, args, reference=None) -> tuple[dict, np.ndarray]:
    from engine import Engine, ParallelConfig
    from engine.metrics import rel_l2

    parallel = ParallelConfig(strategy="tpp" if world > 1 else "none", world_size=world)
    request = dict(steps=args.steps, height=args.size, width=args.size, seed=args.seed)
    with Engine.from_pretrained(args.model, parallel=parallel) as engine:
        list(engine.stream(args.prompt, num_chunks=2, **request))  # warm-up
        stream = engine.stream(args.prompt, num_chunks=args.chunks, float_frames=True, **request)
        frames = np.stack(list(stream))
    report = stream.report
    record = {
        "ranks": world, "strategy": report["strategy"], "chunks": report["chunks"], "frames": report["frames"],
        "time_to_first_frame_s": report["time_to_first_frame_s"], "steady_fps": report["steady_fps"],
        "stage_bound_fps": report["stage_bound_fps"],
        "per_rank": [{k: r[k] for k in ("rank", "steps", "busy_s", "wait_s", "busy_fraction", "wait_fraction",
                                        "decode_s", "bytes_sent", "bytes_received")} for r in report["per_rank"]],
        "vs_serial_rel_l2": None if reference is None else rel_l2(frames, reference),
    }
    return record, frames


def table(records: list, cores: int) -> str:
    base = records[0]
    rows = [HEADER]
    for r in records:
        ranks = r["per_rank"]
        steps = " / ".join(str(len(p["steps"])) for p in ranks)
        busy = " / ".join("%.0f" % (100 * p["busy_fraction"]) for p in ranks)
        sent = " / ".join("%.2f" % (p["bytes_sent"] / 1e6) for p in ranks)
        err = "-" if r["vs_serial_rel_l2"] is None else "%.1e" % r["vs_serial_rel_l2"]
        rows.append(
            f"| {r['ranks']} | {steps} | {r['time_to_first_frame_s']:.3f} | {r['steady_fps']:.1f} "
            f"| {r['steady_fps'] / base['steady_fps']:.2f} | {r['stage_bound_fps']:.1f} "
            f"| {r['stage_bound_fps'] / base['stage_bound_fps']:.2f} | {busy} | {sent} | {err} |")
    rows.append(f"\n{cores} CPU cores shared by all ranks of a run; the single-rank run has them all. "
                "Stage-bound: frames / the busiest rank's busy seconds.")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-causal-video")
    parser.add_argument("--prompt", default="a red ball bouncing on a blue floor")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", default="2,3,5", help="tpp rank counts to compare with one rank")
    parser.add_argument("--out", default="outputs/bench_stream.json")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",") if w]
    records = []
    serial, reference = measure(1, args)
    records.append(serial)
    for world in worlds:
        print(f"tpp on {world} ranks ...", file=sys.stderr)
        records.append(measure(world, args, reference)[0])
    cores = os.cpu_count() or 1
    for r in records:
        r.update(cores=cores, steps=args.steps, size=args.size, model=args.model)
    write_results(args.out, records, table(records, cores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
