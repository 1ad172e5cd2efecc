"""bf16 patch-sync against the serial bf16 run of the same model. What differs: each band's
GroupNorm statistics, computed in float32 and pooled over the bands, land within ~1e-7
(relative) of the serial single-pass statistics, and after the one rounding to bf16 a few
outputs per layer (~1e-4 of them) fall on the other side of a rounding boundary. Linear
layers, 3x3 convs with halo rows and attention over gathered K/V are bit-identical to
serial on a band, and a CFG split alone (no row split) is exact. The flips then grow over
the steps like any bf16 perturbation. Bound from measurement (README, "Half precision")."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, ParallelConfig
from engine.metrics import rel_l2

KW = dict(height=128, width=128, num_inference_steps=6, seed=0, progress=False)
BF16_PATCH_SYNC_BOUND = 7e-3  # measured 3.5e-3 (2 ranks, tiny-sdxl, 128 px, 6 steps); serial bf16 vs fp32: ~1e-2


@pytest.fixture(scope="module")
def serial_bf16():
    with Engine.from_pretrained("tiny-sdxl", dtype=torch.bfloat16) as engine:
        yield engine.generate("a red circle", **KW).latents.float().numpy()


def test_bf16_patch_sync_is_within_the_measured_bound_and_a_cfg_split_is_exact(serial_bf16):
    config = ParallelConfig(strategy="patch-sync", world_size=2)
    with Engine.from_pretrained("tiny-sdxl", dtype=torch.bfloat16, parallel=config) as engine:
        bands = engine.generate("a red circle", parallel=ParallelConfig(strategy="patch-sync", cfg_split=False), **KW)
        halves = engine.generate("a red circle", parallel=ParallelConfig(strategy="patch-sync", cfg_split=True), **KW)
    assert bands.report["dtype"] == "bfloat16"
    err = rel_l2(bands.latents.float().numpy(), serial_bf16)
    assert 0.0 < err <= BF16_PATCH_SYNC_BOUND, f"bf16 patch-sync vs serial bf16: rel L2 {err:.2e}"
    assert rel_l2(halves.latents.float().numpy(), serial_bf16) == 0.0
