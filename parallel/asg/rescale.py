"""guidance_rescale under asg over ranks.

diffusers rescales the CFG prediction by the ratio of two standard deviations taken over the
whole latent (`rescale_noise_cfg`, Lin et al. 2023), inside the pipeline's loop with no hook.
A tile rank holds its own region of the prediction only, so during a parallel asg request
the pipeline module's `rescale_noise_cfg` is replaced by one whose standard deviations come
from every rank's owned positions: one all-reduce of four sums per image, at the same point
of every step on every rank (the branch rank owns nothing and contributes zeros).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from comms import wire


def _moments(x: torch.Tensor, owned: torch.Tensor | None) -> torch.Tensor:
    """(2, B) float64: the sum and the sum of squares of each image's owned positions (a
    multiplied mask, not a boolean index, which would sync a GPU)."""
    if owned is None:
        return x.new_zeros(2, x.shape[0], dtype=torch.float64)
    mine = x.double() * owned.to(torch.float64)
    return torch.stack([mine.flatten(1).sum(1), (mine * mine).flatten(1).sum(1)])


def _std(moments: torch.Tensor, count: int) -> torch.Tensor:
    """The unbiased standard deviation (as torch.std) from whole-tensor sums."""
    total, squares = moments
    return ((squares - total * total / count) / (count - 1)).clamp_min(0).sqrt()


def whole_rescale(owned: torch.Tensor | None, stats):
    """`rescale_noise_cfg` with standard deviations over the whole latent, assembled from
    each rank's `owned` positions (None: none, the branch)."""

    def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
        packed = torch.cat([_moments(noise_pred_text, owned), _moments(noise_cfg, owned)])  # (4, B)
        size = packed.numel() * packed.element_size()
        stats.record_op(size, size, kind="rescale")
        with stats.waiting(packed.device):
            wire.all_reduce(packed)
        count = noise_cfg[0].numel()
        shape = (-1,) + (1,) * (noise_cfg.ndim - 1)
        # the deviations in the prediction's dtype, as diffusers divides them
        ratio = (_std(packed[:2], count).to(noise_cfg.dtype) / _std(packed[2:], count).to(noise_cfg.dtype)).view(shape)
        return guidance_rescale * noise_cfg * ratio + (1 - guidance_rescale) * noise_cfg

    return rescale_noise_cfg


@contextmanager
def rescaled_over_ranks(pipe, owned: torch.Tensor | None, stats):
    """While active, `pipe`'s pipeline module rescales with whole-latent deviations."""
    module = sys.modules[type(pipe).__call__.__module__]
    original = getattr(module, "rescale_noise_cfg", None)
    if original is None:  # a pipeline without guidance_rescale (refused before the ranks)
        yield
        return
    module.rescale_noise_cfg = whole_rescale(owned, stats)
    try:
        yield
    finally:
        module.rescale_noise_cfg = original
