"""Isolated ranks (benchmarks/isolated.py, comms/isolated.py): rank r of N alone does
exactly a real rank's work: with the exchanges of a real run replayed, its result equals
that run's, and it issues the same operations and bytes in every step."""

import numpy as np
import pytest
import torch

from benchmarks.isolated import IsolatedRanks, Subject, measure, rank_positions, summarize
from comms.isolated import RECORD_ENV
from engine import Engine, ParallelConfig
from engine.models import load_pipeline, pipeline_call_kwargs

MODEL, SIZE, STEPS, WORLD = "tiny-sd", 192, 3, 3  # 24 latent rows: three bands of 8 (align 8)


def _pipeline_latents(pipe, seed):
    out = pipe(prompt=["a red circle"], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **pipeline_call_kwargs(pipe))
    return out.images


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real 3-rank engine whose ranks record what they receive."""
    directory = tmp_path_factory.mktemp("recorded")
    mp = pytest.MonkeyPatch()
    mp.setenv(RECORD_ENV, str(directory))
    engine = Engine.from_pretrained(MODEL, parallel=ParallelConfig(strategy="patch", world_size=WORLD))
    mp.undo()  # only the spawned ranks record
    yield engine, str(directory)
    engine.close()


# patch-sync (all-gathers only) and pcpp (point-to-point after warm-up) cover both exchange shapes
@pytest.mark.parametrize("strategy,warmup", [("patch-sync", 0), ("pcpp", 1)])
def test_isolated_rank_replays_a_real_run_exactly(recorded, strategy, warmup):
    engine, directory = recorded
    config = ParallelConfig(strategy=strategy, warmup_steps=warmup, cfg_split=False)
    real = engine.generate("a red circle", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=3,
                           guidance_scale=5.0, parallel=config, progress=False)
    pipe = load_pipeline(MODEL, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    isolated = IsolatedRanks(Subject(MODEL, pipe, pipe.unet, None, (SIZE // 8, SIZE // 8), torch.device("cpu")),
                             replay_dir=directory)
    for rank in range(WORLD):
        isolated.place(WORLD, rank)
        with torch.no_grad(), isolated.request(config):
            latents = _pipeline_latents(pipe, seed=3)
        # every other band is replayed; this rank's own band of every gather is what it computed
        np.testing.assert_allclose(latents.numpy(), real.latents, rtol=1e-4, atol=1e-5)  # threads differ
        mine = real.report["per_rank"][rank]["per_step"]
        ours = isolated.stats.per_step()
        assert [(s["collectives"], s["bytes_sent"], s["bytes_received"], s["bytes_by_kind"]) for s in ours] == \
               [(s["collectives"], s["bytes_sent"], s["bytes_received"], s["bytes_by_kind"]) for s in mine]


def test_isolated_rank_without_replay_computes_its_band_only(recorded):
    """Fixed data in place of the peers: a finite result, the real run's counts, and a
    measurement record with host and work time per step."""
    engine, _ = recorded
    config = ParallelConfig(strategy="patch", warmup_steps=1, cfg_split=False)
    real = engine.generate("a red circle", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=3,
                           guidance_scale=5.0, parallel=config, progress=False)
    pipe = load_pipeline(MODEL, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    isolated = IsolatedRanks(Subject(MODEL, pipe, pipe.unet, None, (SIZE // 8, SIZE // 8), torch.device("cpu")))
    isolated.place(WORLD, 1)
    with torch.no_grad(), isolated.request(config):
        latents = _pipeline_latents(pipe, seed=3)
    assert torch.isfinite(latents).all()
    counts = [(s["collectives"], s["bytes_sent"]) for s in isolated.stats.per_step()]
    assert counts == [(s["collectives"], s["bytes_sent"]) for s in real.report["per_rank"][1]["per_step"]]


def test_measure_reports_steady_steps_and_a_summary():
    from benchmarks.isolated import load_subject

    subject = load_subject(MODEL, 128, torch.device("cpu"))
    serial = measure(subject, steps=3, steady_from=1)
    isolated = IsolatedRanks(subject)
    point = isolated.measure(ParallelConfig(strategy="patch", warmup_steps=1), world=2, rank=0, steps=3)
    for record in (serial, point):
        assert record["step_s"] > 0 and 0 < record["work_s"] and 0 <= record["host_s"] <= record["step_s"] * 1.5
    assert point["ops_per_step"] > 0 and point["bytes_sent_per_step"] > 0
    assert [s["step"] for s in point["comm_per_step"]] == [0, 1, 2]
    rows = summarize([dict(serial, model=MODEL, size=128, strategy="serial", world_size=1, rank=0),
                      dict(point, model=MODEL, size=128, strategy="patch", world_size=2, rank=0)])
    assert rows[0]["compute_speedup"] == pytest.approx(serial["step_s"] / point["step_s"])
    assert rank_positions(8, "edges") == [0, 4, 7] and rank_positions(3, "all") == [0, 1, 2]


def test_tessera_bench_isolated_writes_json_and_table(tmp_path):
    import json

    from launch.cli import main

    out = tmp_path / "isolated.json"
    assert main(["bench", "--isolated", "--models", MODEL, "--sizes", "128", "--strategies", "patch,patch-sync",
                 "--worlds", "2", "--steps", "3", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(r["strategy"], r["world_size"], r["rank"]) for r in data["records"]} == {
        ("serial", 1, 0), ("patch", 2, 0), ("patch", 2, 1), ("patch-sync", 2, 0), ("patch-sync", 2, 1)}
    assert [(s["strategy"], s["world_size"]) for s in data["summary"]] == [("patch", 2), ("patch-sync", 2)]
    assert "compute speed-up" in (tmp_path / "isolated.md").read_text()
