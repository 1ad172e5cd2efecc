"""The demo's picture and table, on small fake images and reports (no generation)."""

import numpy as np

from launch.demo import compose, row, table


def _report(strategy, denoise, vs=None):
    report = {"strategy": strategy, "height": 64, "latency_s": denoise + 0.5, "denoise_s": denoise}
    if vs:
        report["vs_serial"] = vs
    return report


def test_compose_puts_panels_side_by_side_with_captions():
    small = np.zeros((16, 16, 3), np.uint8)
    big = np.full((32, 32, 3), 128, np.uint8)
    sheet = compose([(small, ["(a) native"]), (big, ["(b) tiles", "1.0 s"])], title="a title")
    pixels = np.asarray(sheet)
    assert sheet.width > 2 * 32 and sheet.height > 32
    assert (pixels == 0).all(axis=2).sum() >= 32 * 32  # the small one enlarged to the big one's size
    below = np.nonzero((pixels == 128).all(axis=2).any(axis=1))[0].max() + 1  # the rows under the panels
    assert (pixels[below:] < 128).any()  # caption text


def test_table_rows_speedup_and_note():
    rows = [row("native", "native 32 px", _report("none", 1.0), 1),
            row("asg", "asg", _report("asg", 2.0, {"serial_denoise_s": 1.0, "psnr_db": float("inf"),
                                                   "latent_rel_l2": 0.0}), 2),
            row("patch", "patch", _report("patch", 1.0, {"serial_denoise_s": 1.5, "psnr_db": 30.0,
                                                         "latent_rel_l2": 0.01}), 2)]
    assert rows[1]["speedup"] == 0.5 and rows[2]["speedup"] == 1.5
    text = table(rows, cores=2)
    assert "| asg | asg | 2 | 64 | 2.50 | 2.00 | 1.00 | 0.50x | identical |" in text
    assert "| native 32 px | none | 1 | 64 | 1.50 | 1.00 | - | - | - | - |" in text
    assert "Speed-up below 1 (asg)" in text and "overheads" in text
    assert "below 1" not in table(rows[2:], cores=2)
    assert "load average 3.0" in table(rows, cores=2, load=3.0) and "load average" not in text
