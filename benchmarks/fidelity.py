"""Fidelity and traffic of the stale strategies vs serial: strategy x world size x portion.

    python -m benchmarks.fidelity --model tiny-sdxl --sizes 512 --steps 20 --worlds 2,4,8 \\
        --strategies patch,pcpp:0.1,pcpp:0.3,pcpp:0.5

For every point: PSNR and relative L2 of the image and latents vs the serial output
(computed once per size), and the bytes one rank sends in one stale step, split into the
self-attention K/V and everything (halo rows, GroupNorm statistics, the output gather).
`K/V vs patch` is pcpp's K/V bytes over patch's at the same size, world size and warm-up.
Writes JSON (one record per point) and a markdown table. Latencies on a shared CPU
machine are not comparable across runs; fidelity and bytes are.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np
import torch

from benchmarks.output import write_results

PROMPT = "a red circle and a blue square on a dark background"
HEADER = (
    "| model | size | ranks | strategy | warm-up | PSNR vs serial (dB) | latent rel L2 | "
    "K/V MB sent per step | K/V vs patch | all MB sent per step |\n|---|---|---|---|---|---|---|---|---|---|"
)


def parse_strategies(text: str) -> list[tuple[str, float | None]]:
    """"patch,pcpp:0.3" -> [("patch", None), ("pcpp", 0.3)]."""
    out = []
    for item in text.split(","):
        name, _, portion = item.partition(":")
        out.append((name, float(portion) if portion else None))
    return out


def _stale_step_bytes(report: dict) -> tuple[float, float]:
    """Mean over ranks of (K/V bytes, all bytes) sent in the last (stale) step."""
    kv, total = [], []
    for part in report["per_rank"]:
        step = part["per_step"][-1]
        kv.append(step["bytes_by_kind"].get("kv", {}).get("sent", 0))
        total.append(step["bytes_sent"])
    return float(np.mean(kv)), float(np.mean(total))


def run(model, sizes, steps, worlds, strategies, warmups, seed, guidance, out_rows, gn_modes=("corrected",)):
    from engine import Engine, ParallelConfig
    from engine.metrics import compare

    request = dict(num_inference_steps=steps, seed=seed, guidance_scale=guidance, progress=False)
    with Engine.from_pretrained(model) as serial:  # the reference, computed once per size
        references = {size: serial.generate(PROMPT, height=size, width=size, **request) for size in sizes}
    points = [(s, w, st, p, gn) for s in sizes for w in warmups for st, p in strategies for gn in gn_modes]
    records, done = [], 0
    for world in worlds:
        start = ParallelConfig(strategy="patch", world_size=world, cfg_split=False)
        with Engine.from_pretrained(model, parallel=start) as engine:
            patch_kv = {}
            for size, warmup, strategy, portion, gn_mode in points:
                config = ParallelConfig(strategy=strategy, cfg_split=False, warmup_steps=warmup, gn_mode=gn_mode,
                                        pcpp_portion=portion if portion is not None else 0.3)
                result = engine.generate(PROMPT, height=size, width=size, parallel=config, **request)
                ref = references[size]
                vs = compare(np.asarray(result.images), np.asarray(ref.images), result.latents.numpy(),
                             ref.latents.numpy())
                kv, total = _stale_step_bytes(result.report)
                if strategy == "patch" and gn_mode == gn_modes[0]:
                    patch_kv[(size, warmup)] = kv
                base = patch_kv.get((size, warmup))
                records.append({
                    "model": model, "size": size, "steps": steps, "world_size": world, "strategy": strategy,
                    "pcpp_portion": portion, "warmup_steps": warmup, "gn_mode": gn_mode, "seed": seed, "guidance_scale": guidance,
                    "psnr_db": vs["psnr_db"], "rel_l2": vs["rel_l2"], "latent_rel_l2": vs["latent_rel_l2"],
                    "kv_bytes_sent_per_step": kv, "bytes_sent_per_step": total,
                    "kv_vs_patch": kv / base if base else None,
                    "latency_s": result.report["latency_s"], "serial_latency_s": ref.report["latency_s"],
                    "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                "python": platform.python_version()},
                })
                done += 1
                print(f"[{done}/{len(points) * len(worlds)}] " + row(records[-1]), file=sys.stderr, flush=True)
                out_rows.append(row(records[-1]))
    return records


def row(r: dict) -> str:
    name = r["strategy"] + (f" {r['pcpp_portion']:g}" if r["strategy"] == "pcpp" else "")
    if r.get("gn_mode", "corrected") != "corrected":
        name += f", GN {r['gn_mode']}"
    ratio = f"{r['kv_vs_patch']:.1%}" if r["kv_vs_patch"] is not None else "-"
    return (f"| {r['model']} | {r['size']} | {r['world_size']} | {name} | {r['warmup_steps']} | {r['psnr_db']:.2f} | "
            f"{r['latent_rel_l2']:.4f} | {r['kv_bytes_sent_per_step'] / 1e6:.3f} | {ratio} | "
            f"{r['bytes_sent_per_step'] / 1e6:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--sizes", default="512", help="comma-separated image sizes (square)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--strategies", default="patch,pcpp:0.1,pcpp:0.3,pcpp:0.5",
                        help="comma-separated; pcpp:P sets the portion (patch first: the K/V ratio's base)")
    parser.add_argument("--warmups", default="4")
    parser.add_argument("--gn-modes", default="corrected", help="comma-separated GroupNorm modes (corrected first)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", default="outputs/fidelity.json")
    args = parser.parse_args(argv)
    rows: list[str] = []
    records = run(args.model, [int(s) for s in args.sizes.split(",")], args.steps,
                  [int(w) for w in args.worlds.split(",")], parse_strategies(args.strategies),
                  [int(w) for w in args.warmups.split(",")], args.seed, args.guidance, rows,
                  tuple(m for m in args.gn_modes.split(",") if m))
    write_results(args.out, records, HEADER + "\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
