"""Small blocking helpers on whole objects (set-up checks, reports): not on the hot path."""

from __future__ import annotations

import torch
import torch.distributed as dist

import comms.wire as wire


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj`, in rank order; [obj] when not distributed."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    wire.all_gather_object(out, obj, group=group)
    return out


def check_same_weights(model_name: str, params) -> None:
    """Every rank must hold the same weights, or their parts silently disagree: compare a
    fingerprint (the sum of all parameters) across ranks."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        fingerprint = torch.stack([p.double().sum() for p in params]).sum().item()  # one read-back
    prints = all_gather_object((model_name, fingerprint))
    if len({round(f, 6) for _, f in prints}) != 1:
        raise RuntimeError(f"ranks loaded different models: {prints}")
