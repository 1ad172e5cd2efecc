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
