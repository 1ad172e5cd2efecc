"""Small blocking helpers on whole objects (set-up checks, reports): not on the hot path."""

from __future__ import annotations

import torch.distributed as dist


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj`, in rank order; [obj] when not distributed."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
