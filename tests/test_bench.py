"""`tessera bench`: one small sweep end to end (engine strategy + diffusers' Ulysses peer)."""

from __future__ import annotations

import json
import os

from launch.cli import main


def test_bench_writes_records_table_and_plots(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "tiny-flux", "--strategies", "patch-sync", "--worlds", "2", "--sizes", "128",
               "--steps", "2", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())
    by_strategy = {r["strategy"]: r for r in records}
    assert set(by_strategy) == {"none", "patch-sync", "diffusers-ulysses"}
    assert by_strategy["none"]["speedup"] == 1.0 and by_strategy["none"]["machine"]["cores"] == os.cpu_count()
    for name in ("patch-sync", "diffusers-ulysses"):  # both exact: serial's image up to uint8 rounding flips
        r = by_strategy[name]
        assert r["ranks"] == 2 and r["median_denoise_s"] > 0 and r["psnr_db"] > 70, r
        assert r["speedup"] == by_strategy["none"]["median_denoise_s"] / r["median_denoise_s"]
    sync = by_strategy["patch-sync"]["per_rank"]
    assert len(sync) == 2 and all(p["bytes_sent_per_step"] > 0 and p["peak_mem_bytes"] > 0 for p in sync)
    assert "adaptation" in by_strategy["diffusers-ulysses"]
    assert "| tiny-flux | 128 | patch-sync | 2 |" in (tmp_path / "bench.md").read_text()
    for kind in ("speedup", "bytes", "psnr"):
        assert (tmp_path / f"bench_tiny-flux_128_{kind}.png").stat().st_size > 1000


def test_bench_refuses_strategies_it_cannot_sweep(capsys):
    assert main(["bench", "--strategies", "asg"]) == 2
    assert "bench sweeps the patch strategies" in capsys.readouterr().err


def test_repetition_counts_separate_objects_of_one_colour():
    import numpy as np

    from benchmarks.repetition import count_objects, parse_setting

    image = np.zeros((64, 64, 3), np.uint8)
    image[2:22, 2:22] = (230, 20, 20)  # a big red square
    image[40:50, 40:50] = (230, 20, 20)  # a red square of a quarter its area
    image[30:32, 2:4] = (230, 20, 20)  # a speck, below the minimum area
    image[40:60, 2:22] = (20, 20, 230)  # blue: another colour
    image[22:26, 22:26] = (230, 20, 20)  # touches the big one at a corner only: its own region
    blobs, major = count_objects(image, "red", min_area=20 / 64**2)
    assert (blobs, major) == (2, 2)
    assert count_objects(image, "blue", min_area=20 / 64**2) == (1, 1)
    assert count_objects(image, "green", min_area=0.0) == (0, 0)
    assert parse_setting("a:asg_strength=0.5,asg_detail_steps=2") == ("a", {"asg_strength": 0.5, "asg_detail_steps": 2})
