"""`tessera demo` (`make demo`): what the engine does beyond a model's native size, in one
picture and one table.

One prompt and seed, four runs:
(a) the model at its native size, serial (what it was trained for);
(b) plain tiles at the demo size over the ranks: `asg` with `asg_strength=0`, native-size
    tiles averaged where they overlap (MultiDiffusion) and no structure guidance, so every
    tile window draws the prompt's objects again;
(c) `asg` over the ranks: the same tiles pulled towards a structure branch of the whole image;
and, in the table only, (d) `patch`: row bands of the whole latent with stale activations.

Each parallel run carries `compare_serial`: the same request runs again on rank 0 alone in
the same run (for `asg`, the single-process run of the same algorithm), which gives its
speed-up and its fidelity: one device against N, where on a CPU a "device" is one rank's share
of the cores (a serial run with all the threads of one process scales worse than processes
on a small or busy machine, so it would not be the honest baseline there). One group of ranks serves the three parallel requests (the
strategy is per request). Writes DIR/demo.png (a, b, c side by side, captioned),
DIR/demo.json (rows and full reports) and DIR/demo.md (the table, also printed).
"""

from __future__ import annotations

import math
import os

import numpy as np

# One object makes repetition easy to see; seed 3 draws it cleanly at the native size
# (shapes-sd's two-shape captions often lose a shape, see its model card).
DEMO_PROMPT = "a red circle on a dark background"
DEMO_SEED = 3


def add_parser(sub) -> None:
    from launch.cli import DEFAULT_MODEL

    demo = sub.add_parser("demo", help="native size vs plain tiles vs asg at 2x, with speed-ups (make demo)")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--size", type=int, default=None, help="pixels of the parallel runs (default: twice native)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--guidance", type=float, default=5.0)
    demo.add_argument("--seed", type=int, default=DEMO_SEED)
    demo.add_argument("--nproc", type=int, default=2, help="ranks of the parallel runs")
    demo.add_argument("--no-patch", dest="patch", action="store_false", help="leave out the patch row")
    demo.add_argument("--out-dir", default="outputs", help="where demo.png, demo.json and demo.md go")


# (row name, caption, ParallelConfig fields) of the parallel runs; the first two are pictured.
PARALLEL_RUNS = (
    ("tiles", "plain tiles", dict(strategy="asg", asg_strength=0.0)),
    ("asg", "asg", dict(strategy="asg")),
    ("patch", "patch", dict(strategy="patch", cfg_split=False)),  # bands, not CFG halves
)


def run(args) -> dict:
    """Run the demo; returns what demo.json holds."""
    from engine import ConfigError, Engine, ParallelConfig
    from engine.models import describe_model
    from engine.requests import build_request

    load = os.getloadavg()[0]  # before the demo's own work: others' work slows every run
    info = describe_model(args.model)
    native = info.native_size if info else None
    size = args.size or (2 * native if native else None)
    request = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, progress=False)
    runs = [r for r in PARALLEL_RUNS if args.patch or r[0] != "patch"]
    if args.nproc < 2:
        raise ConfigError(f"the demo compares runs over several ranks: --nproc must be at least 2, got {args.nproc}")
    configs = {name: ParallelConfig(world_size=args.nproc, **fields).validate() for name, _, fields in runs}
    if info is not None:  # bad input fails before any model loads
        for config in configs.values():
            build_request(info, config, args.prompt, height=size, width=size, compare_serial=True, **request)
    rows, images = [], {}

    def record(name, caption, result, ranks):
        rows.append(row(name, caption, result.report, ranks))
        images[name] = np.asarray(result.image.convert("RGB"))
        print(f"{caption}: {result.report['latency_s']:.2f} s", flush=True)

    with Engine.from_pretrained(args.model) as serial:
        native = native or serial.info.native_size
        size = size or 2 * native
        record("native", f"native {native} px", serial.generate(args.prompt, height=native, width=native, **request), 1)
    with Engine.from_pretrained(args.model, parallel=configs[runs[0][0]]) as engine:
        for name, caption, _ in runs:
            result = engine.generate(args.prompt, height=size, width=size, compare_serial=True,
                                     parallel=configs[name], **request)
            record(name, caption, result, args.nproc)
    first = rows[0]
    panels = [(images["native"], [f"(a) native {native} px, serial",
                                  f"{first['latency_s']:.1f} s" + (", shown enlarged" if size > native else "")])]
    for letter, name in (("b", "tiles"), ("c", "asg")):
        r = next(r for r in rows if r["name"] == name)
        panels.append((images[name], [f"({letter}) {size} px, {r['caption']}, {r['ranks']} ranks",
                                       f"{r['latency_s']:.1f} s, speed-up {r['speedup']:.2f}x"]))
    title = f"{args.model}, \"{args.prompt}\", seed {args.seed}, {args.steps} steps"
    return {"model": args.model, "prompt": args.prompt, "seed": args.seed, "steps": args.steps,
            "native": native, "size": size, "ranks": args.nproc, "cores": os.cpu_count(), "load_average": load,
            "rows": rows, "panels": panels, "title": title}


def row(name: str, caption: str, report: dict, ranks: int) -> dict:
    """One table row from a run's report: its times, and against its one-rank reference
    (when it has one) the speed-up of the denoising loop and the fidelity."""
    out = {"name": name, "caption": caption, "strategy": report["strategy"], "ranks": ranks,
           "size": report["height"], "latency_s": report["latency_s"], "denoise_s": report["denoise_s"],
           "reference_denoise_s": None, "speedup": None, "psnr_db": None, "latent_rel_l2": None,
           "report": report}
    vs = report.get("vs_serial")
    if vs:
        out.update(reference_denoise_s=vs["serial_denoise_s"], speedup=vs["serial_denoise_s"] / report["denoise_s"],
                   psnr_db=vs["psnr_db"], latent_rel_l2=vs.get("latent_rel_l2"))
    return out


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    return "identical" if isinstance(value, float) and math.isinf(value) else format(value, fmt)


def table(rows: list[dict], cores: int, gpu: bool = False, load: float = 0.0) -> str:
    """The markdown table, with the notes a reader needs to read it honestly."""
    lines = ["| run | strategy | ranks | size | latency (s) | denoise (s) | one-rank denoise (s) | speed-up "
             "| PSNR vs one rank (dB) | latent rel L2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['caption']} | {r['strategy']} | {r['ranks']} | {r['size']} | {r['latency_s']:.2f} "
                     f"| {r['denoise_s']:.2f} | {_num(r['reference_denoise_s'], '.2f')} "
                     f"| {_num(r['speedup'], '.2f')}{'' if r['speedup'] is None else 'x'} "
                     f"| {_num(r['psnr_db'], '.1f')} | {_num(r['latent_rel_l2'], '.1e')} |")
    lines += ["", "Speed-up: the same request's denoising time on rank 0 alone (same run, one rank's share "
              "of the devices) over the parallel run's; for asg and plain tiles the one-rank run is the same "
              "algorithm in one process, for patch plain serial diffusers. PSNR and rel L2 compare with that run."]
    slow = [r["caption"] for r in rows if r["speedup"] is not None and r["speedup"] < 1]
    if slow:
        where = "no GPU, " if not gpu else ""
        lines.append(f"Speed-up below 1 ({', '.join(slow)}): on this machine ({where}{cores} cores shared by the "
                     "ranks) parallel runs show their overheads (processes, exchanges), not speed-ups; with a "
                     "device per rank the ranks' work runs side by side.")
    if load > cores / 2:
        lines.append(f"Other work was running (load average {load:.1f} on {cores} cores when the demo started): "
                     "every time above is noisy.")
    return "\n".join(lines) + "\n"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def compose(panels: list, title: str = "", pad: int = 8):
    """Images side by side at the height of the largest (smaller ones enlarged, nearest
    neighbour, so pixels stay visible), each with caption lines below and a title on top."""
    from PIL import Image, ImageDraw

    side = max(max(img.shape[:2]) for img, _ in panels)
    font = _font(max(10, side // 18))
    line_h = font.getbbox("Ag")[3] + 4
    caption_h = line_h * max(len(lines) for _, lines in panels) + pad
    title_h = line_h + pad if title else 0
    sheet = Image.new("RGB", (len(panels) * (side + pad) + pad, title_h + pad + side + caption_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for i, (img, lines) in enumerate(panels):
        x = pad + i * (side + pad)
        sheet.paste(Image.fromarray(img).resize((side, side), Image.NEAREST), (x, title_h + pad))
        for k, text in enumerate(lines):
            draw.text((x, title_h + pad + side + 4 + k * line_h), text, fill="black", font=font)
    return sheet


def write(result: dict, out_dir: str) -> str:
    """demo.png, demo.json and demo.md in `out_dir`; returns the table."""
    import torch

    from benchmarks.output import write_results
    from engine.results import json_safe

    os.makedirs(out_dir, exist_ok=True)
    compose(result["panels"], result["title"]).save(os.path.join(out_dir, "demo.png"))
    text = table(result["rows"], result["cores"], gpu=torch.cuda.is_available(), load=result["load_average"])
    record = {k: v for k, v in result.items() if k != "panels"}
    write_results(os.path.join(out_dir, "demo.json"), json_safe(record), text)
    print(f"image: {os.path.abspath(os.path.join(out_dir, 'demo.png'))}")
    return text


def demo_command(args) -> int:
    write(run(args), args.out_dir)
    return 0
