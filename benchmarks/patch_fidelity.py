"""Fidelity and traffic of `patch` vs serial, for several world sizes and warm-ups.

    python -m benchmarks.patch_fidelity --model tiny-sdxl --sizes 512 --steps 20 --worlds 2,4

Writes JSON (one record per point) and prints a markdown table. Latencies on a shared CPU
machine are not comparable across runs; fidelity and bytes are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import torch


PROMPT = "a red circle and a blue square on a dark background"


def run(model: str, sizes: list[int], steps: int, worlds: list[int], warmups: list[int], seed: int, gn_mode: str):
    from engine import Engine, ParallelConfig
    from engine.fidelity import compare

    request = dict(num_inference_steps=steps, seed=seed, progress=False)
    serial = Engine.from_pretrained(model)  # the reference, computed once per size
    references = {size: serial.generate(PROMPT, height=size, width=size, **request) for size in sizes}
    records = []
    for world in worlds:
        config = ParallelConfig(strategy="patch", world_size=world, cfg_split=False, gn_mode=gn_mode)
        with Engine.from_pretrained(model, parallel=config) as engine:
            for size, warmup in [(size, warmup) for size in sizes for warmup in warmups]:
                result = engine.generate(
                    PROMPT, height=size, width=size, **request,
                    parallel=ParallelConfig(strategy="patch", cfg_split=False, warmup_steps=warmup, gn_mode=gn_mode),
                )
                ref = references[size]
                vs = compare(np.asarray(result.images), np.asarray(ref.images), result.latents.numpy(), ref.latents.numpy())
                rep = result.report
                per_step = [r["per_step"][-1] for r in rep["per_rank"]]  # a stale step
                records.append({
                    "model": model, "size": size, "steps": steps, "world_size": world, "warmup_steps": warmup,
                    "gn_mode": gn_mode, "seed": seed,
                    "psnr_db": vs["psnr_db"], "rel_l2": vs["rel_l2"], "latent_rel_l2": vs["latent_rel_l2"],
                    "bytes_sent_per_step": [s["bytes_sent"] for s in per_step],
                    "bytes_received_per_step": [s["bytes_received"] for s in per_step],
                    "latency_s": rep["latency_s"], "serial_latency_s": ref.report["latency_s"],
                    "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
                })
                print(_row(records[-1]), flush=True)
    serial.close()
    return records


def _row(r: dict) -> str:
    sent = ", ".join(f"{b / 1e6:.2f}" for b in r["bytes_sent_per_step"])
    return (f"| {r['model']} | {r['size']} | {r['world_size']} | {r['warmup_steps']} | {r['psnr_db']:.2f} | "
            f"{r['latent_rel_l2']:.4f} | {sent} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--sizes", default="512", help="comma-separated image sizes (square)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--warmups", default="4")
    parser.add_argument("--gn-mode", default="corrected")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="outputs/patch_fidelity.json")
    args = parser.parse_args(argv)
    print("| model | size | ranks | warm-up | PSNR vs serial (dB) | latent rel L2 | MB sent per step, per rank |")
    print("|---|---|---|---|---|---|---|")
    records = run(args.model, [int(s) for s in args.sizes.split(",")], args.steps, [int(w) for w in args.worlds.split(",")],
                  [int(w) for w in args.warmups.split(",")], args.seed, args.gn_mode)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=2)
    print(f"json: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
