"""Start-up time and per-request overhead of the Ray launcher vs the local launcher.

    python -m benchmarks.launchers --model tiny-sd --world 2 --size 256 --steps 10 --requests 5

Both launchers serve the same requests (same strategy, size and seeds) in one run. For each:
the time from `Engine.from_pretrained` to a ready group, and per request the driver's wall
time and the ranks' own latency (`report["latency_s"]`: denoise + decode on rank 0); the
difference is what the launcher adds (sending the request, returning images and reports).
Writes JSON and a markdown table. Ray runs on a private one-node cluster unless --address.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks.output import write_results

HEADER = ("| launcher | ranks | size | steps | start-up (s) | request wall, median (s) | ranks' latency, median (s) "
          "| launcher overhead, median (ms) |\n|---|---|---|---|---|---|---|---|")


def measure(launcher: str, args) -> dict:
    from engine import Engine, ParallelConfig

    extra = {"launcher": launcher}
    if launcher == "ray" and args.address:
        extra["address"] = args.address
    start = time.perf_counter()
    engine = Engine.from_pretrained(args.model, parallel=ParallelConfig(strategy=args.strategy,
                                                                        world_size=args.world), **extra)
    startup = time.perf_counter() - start
    walls, latencies = [], []
    try:
        for i in range(args.requests + 1):  # the first request warms caches: not counted
            t = time.perf_counter()
            result = engine.generate("a red circle and a blue square", height=args.size, width=args.size,
                                     num_inference_steps=args.steps, seed=i, progress=False)
            wall = time.perf_counter() - t
            if i:
                walls.append(wall)
                latencies.append(result.report["latency_s"])
            print(f"{launcher}: request {i} {wall:.3f} s", file=sys.stderr, flush=True)
    finally:
        engine.close()
    overheads = [w - lat for w, lat in zip(walls, latencies)]
    return {"launcher": launcher, "world_size": args.world, "size": args.size, "steps": args.steps,
            "strategy": args.strategy, "model": args.model, "startup_s": startup, "request_wall_s": walls,
            "rank_latency_s": latencies, "overhead_s": overheads}


def row(r: dict) -> str:
    return (f"| {r['launcher']} | {r['world_size']} | {r['size']} | {r['steps']} | {r['startup_s']:.1f} | "
            f"{statistics.median(r['request_wall_s']):.3f} | {statistics.median(r['rank_latency_s']):.3f} | "
            f"{1e3 * statistics.median(r['overhead_s']):.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strategy", default="patch")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--address", default=None, help="a running Ray cluster")
    parser.add_argument("--out", default="outputs/launchers.json")
    args = parser.parse_args(argv)
    records = [measure(name, args) for name in ("local", "ray")]
    write_results(args.out, records, HEADER + "\n" + "\n".join(row(r) for r in records) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
