"""GroupNorm over a row band with global statistics.

Each rank computes per-(sample, group) mean and variance of its band in float32 and the
ranks all-gather them. Band j holds a share w_j of the pixels (the same at every level).

- Sync (exact): the fresh statistics combine as a pooled variance,
      mean = sum_j w_j m_j,   var = sum_j w_j (v_j + (m_j - mean)^2).
- Corrected (DistriFusion's corrected asynchronous GroupNorm): the stale global statistics
  (the same pooled combination of every band's stale statistics, own band included) plus
  this band's whole change since it posted them,
      E[x]   = E[x]_global,stale   + (E_i[x]_fresh   - E_i[x]_stale)
      E[x^2] = E[x^2]_global,stale + (E_i[x^2]_fresh - E_i[x^2]_stale),
  i.e. every band is assumed to change like this one, which adjacent steps make nearly
  true. (Mixing the fresh band in at its share w_i instead assumes the other bands did not
  change at all: on tiny-sdxl 512^2 that was 7x further from serial.) The variance is
  written below without the cancellation of E[x^2] - E[x]^2; where it comes out negative
  the band's fresh variance is used, as in DistriFusion.
- Extrapolated (gn_mode="extrapolated"): the corrected rule applied to stale statistics
  predicted one step ahead from the last two the layer saw,
      S(t) ~ S(t-1) + X (S(t-1) - S(t-2))
  for S = the global (pooled) mean and variance and this band's own, so the band's
  correction is the error of that prediction. Same bytes; the layer keeps one older copy
  of the (tiny) statistics. X = GN_EXTRAPOLATION, chosen by measurement on the trained
  shapes-sd (README, "Measured here"): larger factors gain more at 2 and 4 ranks but made
  8 ranks diverge. Extrapolating the K/V or halo rows the same way gained nothing or
  diverged there, so only the statistics are predicted.
The statistics are tiny, so stale posts are coalesced into one collective per step.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.patch.context import SwappedLayer

GN_EXTRAPOLATION = 0.25


def pooled(weights: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, var) of bands with pixel shares `weights` (m,) and stats (m, b, g)."""
    g_mean = torch.tensordot(weights, mean, dims=1)
    g_var = torch.tensordot(weights, var + (mean - g_mean).square(), dims=1)
    return g_mean, g_var


def corrected(stale_mean, stale_var, fresh_mean, fresh_var, own_stale_mean, own_stale_var):
    """Stale global (mean, var) plus this band's change in E[x] and E[x^2].

    With d = m_f - m_s (this band's change of mean), M the stale global mean:
      mean = M + d
      var  = E[x^2]_stale + (v_f + m_f^2 - v_s - m_s^2) - (M + d)^2
           = V + (v_f - v_s) + 2 d (m_s - M)          (the same, without cancellation)
    """
    d = fresh_mean - own_stale_mean
    mean = stale_mean + d
    var = torch.addcmul(stale_var + (fresh_var - own_stale_var), d, own_stale_mean - stale_mean, value=2)
    return mean, torch.where(var < 0, fresh_var, var)


def stale_terms(weights: torch.Tensor, stats: torch.Tensor, own: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From stale statistics (m, ..., 2) of every band: (M - m_s, V - v_s), the stale global
    mean and variance minus this band's own, the part of `corrected` that does not depend
    on the fresh statistics (computed once for many layers at a time)."""
    g_mean, g_var = pooled(weights, stats[..., 0], stats[..., 1])
    return g_mean - stats[own, ..., 0], g_var - stats[own, ..., 1]


def corrected_from_terms(shift, spread, fresh_mean, fresh_var, own_stale_mean):
    """`corrected` given `stale_terms`: mean = m_f + (M - m_s),
    var = (V - v_s) + v_f - 2 (m_f - m_s)(M - m_s), the same without cancellation."""
    mean = fresh_mean + shift
    var = torch.addcmul(spread + fresh_var, fresh_mean - own_stale_mean, shift, value=-2)
    return mean, torch.where(var < 0, fresh_var, var)


def _stale_terms(ctx, block: torch.Tensor, k: int, name):
    """This layer's stale terms, from the terms of its whole block (cached for the step)."""
    key = ("gn", name)
    terms = ctx.step_cache.get(key)
    if terms is None:
        terms = ctx.step_cache[key] = stale_terms(ctx.band_weights(block.device), block, ctx.index)
    return terms[0][k], terms[1][k]


class PatchGroupNorm(SwappedLayer, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._row_split()
        if ctx is None:
            return super().forward(x)
        b = x.shape[0]
        g = self.num_groups
        grouped = x.reshape(b, g, -1)
        if grouped.dtype != torch.float32:
            grouped = grouped.float()  # statistics in float32 whatever the model dtype
        var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)

        sync = ctx.gn_sync
        send = None if sync else ctx.exchange.send_view(self._tessera_name)  # stack straight into the bucket
        local = torch.stack([mean, var], dim=-1, out=send) if send is not None else torch.stack([mean, var], dim=-1)
        stats = ctx.exchange.all_gather(  # (m, b, g, 2): fresh when sync, else last step's
            self._tessera_name, local, [local.shape] * ctx.members, sync=sync, coalesce=True, kind="gn", stacked=True
        )
        extrapolated = ctx.layout.config.gn_mode == "extrapolated"
        block = None if sync or extrapolated else ctx.exchange.stale_block(self._tessera_name)
        if block is not None:  # the stale terms of every GroupNorm in this bucket, once per step
            shift, spread = _stale_terms(ctx, *block)
            g_mean, g_var = corrected_from_terms(shift, spread, mean, var, stats[ctx.index, ..., 0])
            return self._normalise(x, g_mean, g_var)
        weights = ctx.band_weights(x.device)
        g_mean, g_var = pooled(weights, stats[..., 0], stats[..., 1])
        if not sync:
            own_mean, own_var = stats[ctx.index].unbind(-1)
            if extrapolated:  # one stacked tensor of the four, so one lerp predicts them all
                seen = torch.stack([g_mean, g_var, own_mean, own_var])
                g_mean, g_var, own_mean, own_var = self._extrapolated_at(seen, ctx, sync=False).unbind(0)
            g_mean, g_var = corrected(g_mean, g_var, mean, var, own_mean, own_var)
        elif extrapolated:  # remember what this step saw for the first stale steps
            self._extrapolated_at(torch.stack([g_mean, g_var, mean, var]), ctx, sync=True)
        return self._normalise(x, g_mean, g_var)

    def _normalise(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps) * weight + bias with the (b, g) float32 statistics
        given, as one kernel over x: an inference batch norm over (1, b * c) channels, which
        computes in float32 and rounds once to x's dtype, as the serial GroupNorm does."""
        b, c = x.shape[:2]
        per_group = c // self.num_groups
        stats = torch.stack([mean, var]).repeat_interleave(per_group, dim=2).view(2, b * c)
        weight, bias = self._affine_for(b)
        out = torch.batch_norm(x.reshape(1, b * c, -1), weight, bias, stats[0], stats[1], False, 0.0, self.eps, False)
        return out.view(x.shape)

    def _affine_for(self, batch: int):
        """The affine parameters repeated over the batch, in float32; cached, and rebuilt
        whenever the parameters are replaced or modified in place (their version moves)."""
        if not self.affine:
            return None, None
        if torch.compiler.is_compiling():  # traced: the compiler folds the repeat into the graph
            return self.weight.float().repeat(batch), self.bias.float().repeat(batch)
        try:
            key = (batch, self.weight.data_ptr(), self.weight._version, self.bias.data_ptr(), self.bias._version)
        except RuntimeError:  # inference tensors keep no version: never cache them
            key = None
        cached = getattr(self, "_tessera_affine", None)
        if key is None or cached is None or cached[0] != key:
            with torch.no_grad():
                weight = self.weight.detach().float().repeat(batch)
                bias = self.bias.detach().float().repeat(batch)
            self._tessera_affine = cached = (key, weight, bias)
        return cached[1], cached[2]

    @torch.compiler.disable  # per-step history keyed by the step number: eager under compile
    def _extrapolated_at(self, stats: torch.Tensor, ctx, sync: bool) -> torch.Tensor:
        return self._extrapolated(stats, ctx.step, sync)

    def _extrapolated(self, stats: torch.Tensor, step: int, sync: bool) -> torch.Tensor:
        """Stale statistics predicted one step ahead from the ones seen a step earlier.
        A sync step sees the statistics of its own step, a stale one those of the step
        before; the layer keeps what it saw by that step (a new request starts afresh)."""
        as_of = step if sync else step - 1
        if step == 0 or not hasattr(self, "_tessera_seen"):
            self._tessera_seen = {}
        seen = self._tessera_seen
        seen[as_of] = stats
        seen.pop(as_of - 2, None)  # keep two
        older = seen.get(as_of - 1)
        if sync or older is None:
            return stats
        return torch.lerp(older, stats, 1.0 + GN_EXTRAPOLATION)
