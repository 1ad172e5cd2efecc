"""Repeated objects beyond the native size: plain tiles vs structure guidance (`asg`).

    python -m benchmarks.repetition --model shapes-sd --size 256 --steps 20 --seeds 0,1,2,3 \\
        --prompt "a red circle on a dark background" --colours red

A model asked for more than its native size draws the prompt's object once per
native-size window. For each setting this generates one image per seed (single process:
the result of `asg` does not depend on the ranks, up to staleness) and counts the
connected regions of each prompt colour: all of at least `--min-area` of the image
("blobs", which also counts small repeated specks) and those of at least a quarter of
the largest one ("major": repeated objects of comparable size). A row at the native size
(strategy none) gives the count the model draws where it was trained. Writes JSON (one
record per setting and colour), a markdown table and one contact sheet per setting.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks.output import write_results

# Default settings: plain tiled generation, the first defaults (0.8, no floor), today's
# defaults, and the mask switched off (floor 1: every position guided alike).
SETTINGS = ("tiled:asg_strength=0", "asg-0.8:asg_strength=0.8,asg_mask_floor=0", "asg", "asg-floor1:asg_mask_floor=1")
# RGB predicates of the shapes-sd palette's pure colours.
COLOURS = {
    "red": lambda r, g, b: (r > 150) & (g < 100) & (b < 100),
    "blue": lambda r, g, b: (b > 150) & (r < 120) & (g < 140),
    "green": lambda r, g, b: (g > 150) & (r < 120) & (b < 120),
}
MAJOR_SHARE = 0.25


def parse_setting(text: str) -> tuple[str, dict]:
    """"asg-0.8:asg_strength=0.8,asg_mask_floor=0" -> ("asg-0.8", {...}); values are numbers."""
    name, _, assignments = text.partition(":")
    options = {}
    for item in filter(None, assignments.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("asg_"):
            raise SystemExit(f"repetition: bad setting {text!r}: expected name:asg_option=value,...")
        options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return name, options


def region_areas(mask: np.ndarray) -> list[int]:
    """Pixel counts of the 4-connected regions of a boolean image."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    areas = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, area = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            area += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        areas.append(area)
    return areas


def count_objects(image: np.ndarray, colour: str, min_area: float) -> tuple[int, int]:
    """(blobs of at least `min_area` of the image, major blobs) of one colour in (H, W, 3) uint8."""
    rgb = image.astype(np.int32)
    areas = np.array(region_areas(COLOURS[colour](rgb[..., 0], rgb[..., 1], rgb[..., 2])))
    if areas.size == 0:
        return 0, 0
    blobs = int((areas >= min_area * rgb.shape[0] * rgb.shape[1]).sum())
    return blobs, int((areas >= MAJOR_SHARE * areas.max()).sum())


def contact_sheet(images: list[np.ndarray], path: str) -> None:
    from PIL import Image

    Image.fromarray(np.concatenate(images, axis=1)).save(path)


def run(args) -> list[dict]:
    from engine import Engine, ParallelConfig

    settings = [parse_setting(s) for s in args.settings]
    for _, options in settings:  # a typo fails before any image is made
        ParallelConfig(strategy="asg", **options).validate()
    request = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, progress=False)
    out_dir = os.path.splitext(args.out)[0]
    os.makedirs(out_dir, exist_ok=True)
    records = []
    with Engine.from_pretrained(args.model) as engine:
        native = engine.info.native_size
        rows = [("native", None, native)] + [(name, options, args.size) for name, options in settings]
        for name, options, size in rows:
            parallel = ParallelConfig(strategy="none") if options is None else ParallelConfig(strategy="asg", **options)
            images = []
            for seed in args.seeds:
                result = engine.generate(args.prompt, height=size, width=size, seed=seed, parallel=parallel, **request)
                images.append(np.asarray(result.images[0].convert("RGB")))
                print(f"{name} seed {seed} done", flush=True)
            contact_sheet(images, os.path.join(out_dir, f"{name}.png"))
            for colour in args.colours:
                counts = [count_objects(image, colour, args.min_area) for image in images]
                records.append({
                    "model": args.model, "prompt": args.prompt, "setting": name, "size": size,
                    "options": options or {"strategy": "none"}, "colour": colour, "seeds": list(args.seeds),
                    "steps": args.steps, "blobs": [c[0] for c in counts], "major": [c[1] for c in counts],
                    "asg": None if options is None else result.report["asg"],
                })
    return records


def table(records: list[dict]) -> str:
    lines = ["| setting | size | colour | blobs per seed | mean | major per seed | mean |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['setting']} | {r['size']} | {r['colour']} | {', '.join(map(str, r['blobs']))} | "
                     f"{np.mean(r['blobs']):.2f} | {', '.join(map(str, r['major']))} | {np.mean(r['major']):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repetition", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--prompt", default="a red circle on a dark background")
    parser.add_argument("--colours", type=lambda s: s.split(","), default=["red"],
                        help=f"comma-separated, of {', '.join(COLOURS)}")
    parser.add_argument("--size", type=int, default=256, help="the high-resolution side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3])
    parser.add_argument("--min-area", type=float, default=30 / 256**2,
                        help="smallest blob counted, as a share of the image (default: 30 px at 256 px)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        help="name:asg_option=value,... (e.g. 'tiled:asg_strength=0'); 'asg' alone: the defaults")
    parser.add_argument("--out", default="outputs/repetition/repetition.json")
    args = parser.parse_args(argv)
    unknown = [c for c in args.colours if c not in COLOURS]
    if unknown:
        parser.error(f"unknown colour(s) {', '.join(unknown)}; choose from {', '.join(COLOURS)}")
    records = run(args)
    write_results(args.out, records, table(records))


if __name__ == "__main__":
    main()
