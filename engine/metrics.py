"""How far a parallel result is from the serial one: PSNR, relative L2, max abs error."""

from __future__ import annotations

import math

import numpy as np


def compare(images: np.ndarray, reference: np.ndarray, latents=None, reference_latents=None) -> dict:
    """Metrics on images scaled to [0, 1] (and on latents when given)."""
    a = images.astype(np.float64) / 255.0
    b = reference.astype(np.float64) / 255.0
    mse = float(np.mean((a - b) ** 2))
    out = {
        "psnr_db": math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse),
        "rel_l2": rel_l2(a, b),
        "max_abs_err": float(np.max(np.abs(a - b))),
    }
    if latents is not None and reference_latents is not None:
        out["latent_rel_l2"] = rel_l2(np.asarray(latents, np.float64), np.asarray(reference_latents, np.float64))
    return out


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a - b))
