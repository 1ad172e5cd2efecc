"""The prepared GPU check (benchmarks/gpu_check.py) in its CPU mode, as CI runs it: every
section runs and passes, and the JSON holds what the GPU run will fill in. Also: a failing
section is recorded with its error and the run goes on; an item that does not fit the time
budget is skipped with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    # a generous budget: on a machine shared with other jobs nothing is skipped for time
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--budget-s", "480", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - start
    print(f"gpu_check --cpu: {elapsed:.1f} s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f), out, elapsed


def test_cpu_mode_runs_every_section(cpu_check):
    results, out, _ = cpu_check
    sections = results["sections"]
    assert list(sections) == ["environment", "single_rank", "multi_rank", "isolated", "projections"]
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("reason"))
        failed = [c for c in section["checks"] if not c["ok"]]
        assert not failed, (name, failed)
    assert results["ok"] is True and results["mode"] == "cpu"
    assert os.path.isfile(os.path.splitext(out)[0] + ".md")


def test_cpu_mode_checks_what_the_gpu_run_checks(cpu_check):
    sections = cpu_check[0]["sections"]
    single = {c["check"] for c in sections["single_rank"]["checks"]}
    for strategy in ("patch", "patch-sync", "pcpp"):
        assert f"tiny-sdxl float32 {strategy} world_size=1 equals serial" in single
    assert any(c.startswith("tiny-sdxl float32 asg") for c in single)
    assert "tiny-causal-video float32 tpp world_size=1 equals none" in single

    multi = sections["multi_rank"]
    assert multi["world_size"] == 2
    exact = {c["check"]: c for c in multi["checks"] if "equals its serial reference" in c["check"]}
    assert exact["sdxl-dir (tiny) patch-sync x2 equals its serial reference"]["latent_rel_l2"] <= 1e-5
    requests = {r["request"] for r in multi["rows"]}
    assert {"patch-sync", "patch", "pcpp", "asg", "tpp"} <= requests
    ratios = [r for r in multi["rows"] if r.get("ratio_row")]
    assert ratios and all(r.get("x_serial") for r in ratios)

    summary = sections["isolated"]["summary"]
    assert {(s["strategy"], s["world_size"]) for s in summary} == {("patch", 2), ("pcpp", 2)}
    assert all(s["compute_speedup"] > 0 and s["ops_per_step"] > 0 for s in summary)
    projections = sections["projections"]
    assert len(projections["rows"]) == len(summary)
    assert projections["costmodel_check"]["flops_speedup"] > 0


def test_a_failing_section_is_recorded_and_the_rest_runs(monkeypatch):
    from benchmarks import gpu_check

    plan = gpu_check.Plan(
        mode="cpu", device="cpu", gpus=0, budget_s=1e9, caps={}, dtypes=[], single_models=[], single_size=0,
        single_steps=0, video_chunks=0, video_steps=0, iso_models=[], iso_sizes=[], iso_worlds=[], iso_strategies=[],
        iso_steps=0, iso_warmup=0, iso_dtype=None, multi_world=0, multi_jobs=[], tpp_world=0, tpp_chunks=0,
        tpp_steps=0, tpp_warmup=False, exact_tol=0.0, profile="h100-nvlink", estimates={})
    results = {"sections": {}}

    def broken(section, plan):
        with section.attempt("an item that raises"):
            raise RuntimeError("boom")
        section.check("an item after it", True)
        assert section.fits("a long item", 10.0)
        assert not section.fits("an item beyond the budget", 1e12)

    gpu_check.run_section(results, "single_rank", broken, plan)
    record = results["sections"]["single_rank"]
    assert record["status"] == "failed"
    failed = [c for c in record["checks"] if not c["ok"]]
    assert len(failed) == 1 and "RuntimeError: boom" in failed[0]["error"]
    assert record["checks"][-1] == {"check": "an item after it", "ok": True}
    assert record["skipped"][0]["item"] == "an item beyond the budget"
    assert "time budget" in record["skipped"][0]["reason"]

    gpu_check.run_section(results, "isolated", lambda section, plan: 1 / 0, plan)
    assert results["sections"]["isolated"]["status"] == "failed"
    assert "ZeroDivisionError" in results["sections"]["isolated"]["error"]

    gpu_check.run_section(results, "projections", lambda section, plan: None, plan, skip_reason="no measurements")
    assert results["sections"]["projections"] == {"status": "skipped", "elapsed_s": 0.0, "reason": "no measurements"}
