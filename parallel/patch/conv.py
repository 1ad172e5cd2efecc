"""Halo convolution: a k x k conv over a row band, with neighbours' boundary rows.

Output row o of a conv reads input rows o*stride - pad .. o*stride - pad + k - 1. For a
band whose boundaries are aligned to the stride, that is `pad` rows above the band and
`k - pad - stride` rows below it (1 and 1 for a 3x3 stride-1 conv, 1 and 0 for stride
2). The first and last bands get zeros exactly where the serial conv pads with zeros.
In stale steps the halo rows are the neighbours' rows of the previous step, except where
this rank holds the whole input anyway (the denoiser's first conv reads the latent, which
every rank has whole): there the halo is sliced from it, fresh and without sending anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.patch.context import SwappedLayer


class HaloConv2d(SwappedLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._row_split()
        if ctx is None:
            return super().forward(x)
        k, stride, pad = self.kernel_size[0], self.stride[0], self.padding[0]
        plan, index = ctx.plan, ctx.index
        scale = plan.scale_for_rows(index, x.shape[-2])
        above = pad  # rows needed from the band above
        below = max(0, k - pad - stride)  # rows needed from the band below (interior bands)
        first, last = index == 0, index == ctx.members - 1
        b, c, _, w = x.shape

        whole = ctx.whole_of(x)
        if whole is not None:  # fresh rows from the full input: no exchange
            start, end = plan.starts[index] // scale, plan.ends[index] // scale
            from_prev = None if first else whole[:, :, start - above : start]
            from_next = None if last else whole[:, :, end : end + below]
        else:
            from_prev, from_next = ctx.exchange.neighbours(
                self._tessera_name,
                x,
                to_prev=None if first or below == 0 else x[:, :, :below],
                to_next=None if last or above == 0 else x[:, :, x.shape[-2] - above :],
                from_prev_shape=None if first else torch.Size((b, c, above, w)),
                from_next_shape=None if last else torch.Size((b, c, below, w)),
                sync=ctx.sync,
                kind="halo",
            )
        if first:
            from_prev = x.new_zeros(b, c, above, w)
        if last:
            total_in = plan.height // scale
            total_out = (total_in + 2 * pad - k) // stride + 1
            band_out_start = plan.starts[index] // scale // stride
            needed_end = (total_out - 1) * stride - pad + k  # one past the last input row read
            pad_below = needed_end - (band_out_start * stride - pad) - above - x.shape[-2]
            from_next = x.new_zeros(b, c, max(0, pad_below), w)
        parts = [t for t in (from_prev, x, from_next) if t is not None and t.shape[-2] > 0]
        extended = torch.cat(parts, dim=2) if len(parts) > 1 else x
        return F.conv2d(
            extended, self.weight, self.bias, self.stride, (0, self.padding[1]), self.dilation, self.groups
        )


def can_halo(conv: nn.Conv2d) -> bool:
    """Convs whose receptive field crosses band boundaries and that this wrapper handles."""
    return (
        conv.kernel_size[0] > 1
        and conv.padding_mode == "zeros"
        and conv.dilation[0] == 1
        and isinstance(conv.padding, tuple)
        and conv.padding[0] < conv.kernel_size[0]
    )
