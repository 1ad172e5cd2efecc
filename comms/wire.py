"""Every data call Tessera makes into torch.distributed, in one place.

The rest of `comms/` calls these functions (looked up at call time, `wire.isend(...)`), so
the testing hooks in `comms.wire_check` can wrap one module to record every operation,
force point-to-point tags to 0 or defer completions, and see all traffic. Peers are global
ranks, as torch.distributed takes them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor; keep older releases working.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_into(recv: torch.Tensor, send: torch.Tensor, group=None, async_op: bool = True):
    """All-gather of equal-sized `send` into `recv` (members' parts in member order)."""
    return _ALL_GATHER(recv, send, group=group, async_op=async_op)


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM, async_op: bool = False):
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int, group=None, async_op: bool = False):
    return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def batch_p2p(ops: list, group=None) -> list:
    """Start a batch of point-to-point ops, each ("send" | "recv", tensor, peer, tag);
    NCCL runs a batch as one group (the order inside it does not matter)."""
    if not ops:
        return []
    return dist.batch_isend_irecv([dist.P2POp(dist.isend if op == "send" else dist.irecv, t, peer, group, tag)
                                   for op, t, peer, tag in ops])


def isend(tensor: torch.Tensor, peer: int, group=None, tag: int = 0):
    return dist.isend(tensor, peer, group, tag)


def irecv(tensor: torch.Tensor, peer: int, group=None, tag: int = 0):
    return dist.irecv(tensor, peer, group, tag)


def all_gather_object(out: list, obj, group=None) -> None:
    dist.all_gather_object(out, obj, group=group)
