"""GroupNorm over a row band with global statistics.

Each rank computes per-(sample, group) mean and variance of its band, all ranks gather
them, and they combine as a pooled variance weighted by each band's share of the pixels:
    mean = sum_j w_j m_j,   var = sum_j w_j (v_j + (m_j - mean)^2).
Sync mode gathers fresh statistics (exact). Corrected mode (DistriFusion's async GN)
uses the other bands' *stale* statistics with this rank's *fresh* ones in place of its
own stale ones, which is the design card's correction
    E[x] = sum_j w_j E_j[x]_stale + w_i (E_i[x]_fresh - E_i[x]_stale)   (same for E[x^2])
written so that the variance can never come out negative.
The statistics are tiny, so stale posts are coalesced into one collective per step.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.context import SwappedLayer


class PatchGroupNorm(SwappedLayer, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._row_split()
        if ctx is None:
            return super().forward(x)
        b, c = x.shape[:2]
        g = self.num_groups
        grouped = x.float().reshape(b, g, -1)
        var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
        local = torch.stack([mean, var], dim=-1)  # (b, g, 2), float32 whatever the model dtype

        gathered = ctx.exchange.all_gather(
            self._tessera_name, local, [local.shape] * ctx.members, sync=ctx.gn_sync, coalesce=True, kind="gn"
        )
        stats = torch.stack([local if j == ctx.index else t for j, t in enumerate(gathered)])  # (m, b, g, 2)
        weights = ctx.band_weights(x.device).view(-1, 1, 1)
        g_mean = (weights * stats[..., 0]).sum(0)
        g_var = (weights * (stats[..., 1] + (stats[..., 0] - g_mean) ** 2)).sum(0)

        normed = (grouped - g_mean.unsqueeze(-1)) * torch.rsqrt(g_var.unsqueeze(-1) + self.eps)
        out = normed.reshape(x.shape)
        if self.affine:  # in float32, then one rounding to the model dtype
            shape = (1, c) + (1,) * (x.dim() - 2)
            out = out * self.weight.float().view(shape) + self.bias.float().view(shape)
        return out.to(x.dtype)
