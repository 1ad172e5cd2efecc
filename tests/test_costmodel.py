"""The GPU cost model: validation against DistriFusion's published table, and the bytes it
takes from the engine's band plan."""

from __future__ import annotations

import pytest

from benchmarks import costmodel
from benchmarks.costmodel import CALIBRATED, MODELS, Census, strategy_plan


def test_validates_against_distrifusion_within_20_percent():
    rows = costmodel.validation_rows(CALIBRATED)
    assert len(rows) == 9
    worst = max(abs(r["error"]) for r in rows)
    assert worst <= 0.20, costmodel.validation_table(rows)
    assert costmodel.main(["--validate"]) == 0


def test_plan_bytes_follow_the_engine_band_plan():
    """One self-attention layer of 64x64 tokens (K+V width 2 x 320, batch 2) and one 3x3 conv,
    at the latent resolution, split over 4 ranks: hand-counted bytes of the busiest rank."""
    spec = MODELS["sdxl"]
    c = Census(flops=1e12, attn=[(2, 64 * 64, 640, 320, 64)], convs=[(2, 320, 64, 64, 1)], norms=0, latent=(64, 64))
    patch = strategy_plan(c, "patch", 4, spec)
    own = 16 * 64 * 640 * 2  # a band of 16 rows, sent to each of 3 peers
    assert patch.bytes == (3 * own + 2 * 64 * 320 * 2) * 2  # + 2 halo rows, bf16
    pcpp = strategy_plan(c, "pcpp", 4, spec, portion=0.25)
    seen = 2 * 4 * 64 * 640 * 2  # 4 boundary rows (a quarter of 16) from each adjacent band
    assert pcpp.bytes == (seen + 2 * 64 * 320 * 2) * 2
    assert patch.stale and pcpp.stale and not strategy_plan(c, "patch-sync", 4, spec).stale
    assert pcpp.flops < patch.flops  # attention over fewer keys


@pytest.mark.parametrize("strategy", ["patch", "pcpp", "patch-sync"])
def test_one_gpu_is_the_baseline(strategy):
    hw = costmodel.PROFILES["a100-nvlink"]
    assert costmodel.speedup("sdxl", 1024, strategy, 1, hw, CALIBRATED) == pytest.approx(1.0)


def test_plan_bytes_equal_what_the_engine_sends(pool):
    """The cost model's K/V and halo bytes for rank 0 of a 2-rank `patch` run of tiny-sd
    (its own UNet, float32) equal the bytes the engine reports for a stale step."""
    import torch

    from benchmarks.costmodel import ModelSpec, census_of
    from engine import ParallelConfig
    from engine.models import load_pipeline

    result = pool.parallel_engine("tiny-sd", 2).generate(
        "a red circle", height=256, width=256, num_inference_steps=4, guidance_scale=5.0, seed=0, progress=False,
        parallel=ParallelConfig(strategy="patch", warmup_steps=1, cfg_split=False))
    step = result.report["per_rank"][0]["per_step"][2]["bytes_by_kind"]  # a stale step
    unet = load_pipeline("tiny-sd", torch.device("cpu")).unet
    spec = ModelSpec("tiny-sd", "", 8, 8, 2, 77, unet=True)
    args = (torch.randn(2, 4, 32, 32), torch.full((2,), 500.0), torch.randn(2, 77, unet.config.cross_attention_dim))
    plan = strategy_plan(census_of(unet, spec, 32, 32, args, {}), "patch", 2, spec, dtype_bytes=4, rank=0)
    assert plan.kv_bytes == step["kv"]["sent"] == step["kv"]["received"]
    assert plan.halo_bytes == step["halo"]["sent"]


def _host_term(tmp_path, host_s, mode="eager", factor=1.0):
    """A HostTerm from an isolated-benchmark JSON with `host_s` per step everywhere."""
    import json

    records = [{"model": "sdxl-layout", "strategy": "serial", "world_size": 1, "rank": 0, "host_s": host_s,
                "aten_ops_per_step": 1000}]
    for n in (2, 8):
        for rank in (0, n - 1):
            records.append({"model": "sdxl-layout", "strategy": "patch", "world_size": n, "rank": rank,
                            "host_s": host_s * (1.5 if rank else 1.0), "aten_ops_per_step": 1200})
    path = tmp_path / "isolated.json"
    path.write_text(json.dumps({"records": records, "summary": []}))
    return costmodel.HostTerm.load(str(path), mode, factor)


def test_host_term_graphs_mode_is_the_validated_model(tmp_path):
    hw = costmodel.PROFILES["a100-nvlink"]
    graphs = _host_term(tmp_path, 1.0, mode="graphs")
    for n in (2, 8):
        assert costmodel.speedup("sdxl", 1024, "patch", n, hw, CALIBRATED, host=graphs) == \
               pytest.approx(costmodel.speedup("sdxl", 1024, "patch", n, hw, CALIBRATED))


def test_host_term_eager_caps_the_step_at_the_host_time(tmp_path):
    hw = costmodel.PROFILES["a100-nvlink"]
    slow = _host_term(tmp_path, 1.0)  # a 1 s host step dwarfs any GPU step: every step is host-bound
    assert slow.seconds("sdxl", "patch", 8) == pytest.approx(1.5 + 1200 * costmodel.LAUNCH_S)
    assert slow.seconds("sdxl", "patch", 4) == slow.seconds("sdxl", "patch", 8)  # nearest measured, larger on ties
    assert costmodel.host_bound("sdxl", 1024, "patch", 8, hw, CALIBRATED, slow)
    # serial and parallel both wait on their hosts: the speed-up is the ratio of host times
    expected = (1.0 + 1000 * costmodel.LAUNCH_S) / (1.5 + 1200 * costmodel.LAUNCH_S)
    assert costmodel.speedup("sdxl", 1024, "patch", 8, hw, CALIBRATED, host=slow) == pytest.approx(expected, rel=1e-6)
    # a negligible host changes nothing, and a faster CPU shrinks the host term
    fast = _host_term(tmp_path, 1e-9)
    assert not costmodel.host_bound("sdxl", 1024, "patch", 8, hw, CALIBRATED, fast)
    assert _host_term(tmp_path, 1.0, factor=0.5).seconds("sdxl", "patch", 2) == pytest.approx(
        1.5 * 0.5 + 1200 * costmodel.LAUNCH_S)  # the slowest rank's host time, scaled
    with pytest.raises(KeyError, match="no host time measured"):
        slow.seconds("pixart-sigma", "patch", 2)
