import pytest

from parallel.patch.bands import BandPlan
from parallel.config import ConfigError


def test_even_split_covers_every_row_once():
    plan = BandPlan.split(32, 32, 4, align=4)
    assert plan.starts == (0, 8, 16, 24) and plan.ends == (8, 16, 24, 32)
    assert plan.weights() == [0.25] * 4


def test_uneven_split_is_aligned_and_sums_to_height_at_every_level():
    plan = BandPlan.split(20, 16, 3, align=4)  # 5 aligned units over 3 ranks: 2, 2, 1
    assert [plan.rows(i) for i in range(3)] == [8, 8, 4]
    for scale in (1, 2, 4):
        assert sum(plan.rows(i, scale) for i in range(3)) == 20 // scale
    assert abs(sum(plan.weights()) - 1.0) < 1e-12
    assert plan.weights()[2] == pytest.approx(0.2)


def test_scale_is_recovered_from_local_rows_and_tokens():
    plan = BandPlan.split(24, 16, 2, align=4)
    assert plan.scale_for_rows(1, 3) == 4
    assert plan.scale_for_tokens(0, (12 // 2) * (16 // 2)) == 2


def test_more_ranks_than_bands_is_a_clear_error():
    with pytest.raises(ConfigError, match="only 4 bands"):
        BandPlan.split(16, 16, 5, align=4)


def test_unaligned_latent_is_rejected():
    with pytest.raises(ConfigError, match="downsampling factor"):
        BandPlan.split(18, 16, 2, align=4)
