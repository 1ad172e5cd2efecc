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


def _tessera(args, **kw):
    return subprocess.run([os.path.join(BIN, "tessera"), *args], cwd=ROOT, capture_output=True, text=True, **kw)


def _torchrun(nproc, args, env=None, **kw):
    cmd = [os.path.join(BIN, "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "launch.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def serial_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "serial.png"
    proc = _tessera([*GEN, "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.asarray(Image.open(out), np.int16)


def test_cli_spawns_ranks_and_writes_image_and_report(tmp_path, serial_image):
    out, report = tmp_path / "img.png", tmp_path / "report.json"
    proc = _tessera([*GEN, "--nproc", "2", "--strategy", "patch", "--no-cfg-split", "--warmup-steps", "2",
                     "--out", str(out), "--report", str(report), "--compare-serial"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"image: {out}" in proc.stdout and f"report: {report}" in proc.stdout
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


DIFFERING_REQUESTS = """
import os
from engine import ConfigError, Engine, ParallelConfig

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    engine = Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(strategy="asg"))
    previews = dict(callback=lambda step, preview: None, callback_steps=1) if rank == 0 else {}
    try:  # rank 0 asks for previews, which asg assembles on every rank: rank 1 does not
        engine.generate("a red circle", height=384, width=384, num_inference_steps=2, progress=False, **previews)
    except ConfigError as exc:
        print(f"rank {rank}: ConfigError: {exc}", flush=True)
"""


def test_torchrun_ranks_whose_requests_differ_are_refused_not_hung(tmp_path):
    """Under torchrun each rank makes its own request: every rank compares them through the
    store first and refuses a difference by field, instead of pairing collectives wrongly."""
    script = tmp_path / "differ.py"
    script.write_text(DIFFERING_REQUESTS)
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    output = proc.stdout + proc.stderr
    assert "the ranks' requests differ in preview_every" in output, output[-3000:]
    assert "a no-op callback on the others will do" in output
    assert time.monotonic() - start < 120
