"""The CLI end to end, torchrun (SPMD), and presets saved as diffusers directories."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from comms.groups import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
GEN = ["generate", "--model", "tiny-sd", "--height", "128", "--width", "128", "--steps", "6", "--seed", "5", "--no-progress"]


def _torchrun(nproc, args, env=None, **kw):
    cmd = [os.path.join(BIN, "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "launch.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def serial_image(tmp_path_factory):
    from launch.cli import main

    out = tmp_path_factory.mktemp("serial") / "serial.png"
    assert main([*GEN, "--out", str(out)]) in (0, None)  # in this process: one rank needs no spawn
    return np.asarray(Image.open(out), np.int16)


def test_cli_spawns_ranks_and_writes_image_and_report(tmp_path, serial_image, capsys):
    from launch.cli import main

    # in this process (its ranks fork from the warm fork server); `make demo` runs the
    # installed `tessera` script itself
    out, report = tmp_path / "img.png", tmp_path / "report.json"
    assert main([*GEN, "--nproc", "2", "--strategy", "patch", "--no-cfg-split", "--warmup-steps", "2",
                 "--out", str(out), "--report", str(report), "--compare-serial"]) in (0, None)
    stdout = capsys.readouterr().out
    assert f"image: {out}" in stdout and f"report: {report}" in stdout
    data = json.loads(report.read_text())
    for key in ("model", "strategy", "world_size", "height", "width", "steps", "latency_s", "per_rank", "vs_serial"):
        assert key in data
    assert (data["model"], data["strategy"], data["world_size"]) == ("tiny-sd", "patch", 2)
    assert [r["rank"] for r in data["per_rank"]] == [0, 1]
    for r in data["per_rank"]:
        for key in ("compute_s", "comm_wait_s", "bytes_sent", "bytes_received", "collectives", "peak_mem_bytes"):
            assert r[key] >= 0
        assert r["bytes_sent"] > 0
    assert set(data["vs_serial"]) >= {"psnr_db", "rel_l2", "max_abs_err"}
    assert Image.open(out).size == (128, 128)


def test_torchrun_spmd_gives_the_serial_image(tmp_path, serial_image):
    out = tmp_path / "tr.png"
    proc = _torchrun(2, [*GEN, "--strategy", "patch-sync", "--out", str(out), "--report", str(tmp_path / "r.json")],
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("image:") == 1  # only rank 0 writes
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["launch"] == "torchrun" and data["world_size"] == 2 and data["cfg_split"] is True
    assert np.abs(np.asarray(Image.open(out), np.int16) - serial_image).max() <= 2


def test_torchrun_rank_failure_stops_the_other_rank_with_the_cause(tmp_path):
    env = dict(os.environ, TESSERA_INJECT_FAULT="rank=1,step=1")
    start = time.monotonic()
    proc = _torchrun(2, [*GEN, "--strategy", "patch", "--no-cfg-split", "--out", str(tmp_path / "x.png")],
                     env=env, timeout=300)
    assert proc.returncode != 0
    assert "injected fault" in proc.stderr
    assert "[tessera rank 0] stopping: rank 1: RuntimeError: injected fault" in proc.stderr
    assert not (tmp_path / "x.png").exists()
    assert time.monotonic() - start < 120  # start-up included; the collective timeout is far longer


def test_preset_saved_as_directory_loads_back_by_path(tmp_path, pool):
    from engine import Engine
    from engine.models import describe_model, save_preset

    path = save_preset("tiny-sd", str(tmp_path / "tiny-sd"))
    assert os.path.isfile(os.path.join(path, "model_index.json"))
    assert describe_model(path).pixel_align == describe_model("tiny-sd").pixel_align
    kw = dict(height=128, width=128, num_inference_steps=3, seed=2, progress=False)
    loaded = Engine.from_pretrained(path).generate("a red circle", **kw)
    preset = pool.serial_engine("tiny-sd").generate("a red circle", **kw)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(preset.image))


def _differing_fields(rank, world):
    """differing_in_store on a real rank: rank 1 differs in "size", the others agree."""
    import torch

    from comms.groups import Topology, differing_in_store

    topo = Topology(rank, world, rank, torch.device("cpu"))
    first = differing_in_store(topo, "t", {"strategy": "patch", "size": "64" if rank != 1 else "128"})
    second = differing_in_store(topo, "t", {"strategy": "patch", "size": "64"})  # a second round, keys reused
    return first, second


def test_ranks_compare_their_requests_through_the_store():
    """Under torchrun every rank builds its own request: the ranks publish a digest per field
    and every rank learns the same list of fields that differ (none the next time)."""
    from multiproc import run_ranks

    assert run_ranks(_differing_fields, 3) == [(["size"], [])] * 3


def test_a_torchrun_rank_refuses_a_request_that_differs_from_its_peers(monkeypatch, pool):
    """The runtime of a torchrun rank checks before any collective; what it says when the
    peers' previews differ under asg (each preview is assembled on every rank)."""
    import engine.runtime.image as image
    from engine import ConfigError, ParallelConfig
    from launch.inprocess import InProcess

    engine = pool.serial_engine("tiny-sd")
    runtime = engine._backend.runtime
    assert isinstance(engine._backend, InProcess) and runtime.requests_per_rank is False  # one rank: nothing to compare
    seen = {}

    def differing(topo, name, fields):
        seen.update(fields)
        return ["preview_every"]

    monkeypatch.setattr(image, "differing_in_store", differing)
    monkeypatch.setattr(runtime, "requests_per_rank", True)  # as InProcess sets it under torchrun
    with pytest.raises(ConfigError, match=r"differ in preview_every \(asg assembles each preview on every rank"):
        engine.generate("a red circle", height=384, width=384, num_inference_steps=2, progress=False,
                        parallel=ParallelConfig(strategy="asg"), callback=lambda step, preview: None)
    assert "preview_every" in seen and "prompt" in seen and "progress" not in seen  # rank-local fields stay out
