"""Testing hooks that check NCCL's semantics on gloo, around `comms.wire`.

gloo matches point-to-point messages by tag and runs each operation on its own, so a
program that passes on gloo can still deadlock or mix up messages on NCCL, which matches
by order and runs a communicator's operations one after another. Three hooks, chosen by
environment variables that spawned ranks read when they start (`install_from_env`):

- TESSERA_WIRE_RECORD=1: every operation is recorded as a token (communicator, operation,
  dtype, elements, and for point-to-point the pair's direction); `take_record()` returns
  them and `check_order` proves that every communicator's members issue the same sequence
  and that every pair's point-to-point traffic matches in order.
- TESSERA_WIRE_TAG0=1: every point-to-point tag is 0, so gloo matches in posting order, as
  NCCL does.
- TESSERA_WIRE_DEFERRED=1: each asynchronous operation completes when posted, but its
  receive buffer holds NaN (all bits set) until `wait()` restores the result, and its send
  buffer is snapshotted and compared at `wait()`: a result read early or a send buffer
  modified in flight shows as NaN or as an error.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import comms.wire as wire

RECORD_ENV, TAG0_ENV, DEFERRED_ENV = "TESSERA_WIRE_RECORD", "TESSERA_WIRE_TAG0", "TESSERA_WIRE_DEFERRED"

_record: list | None = None


def _group_key(group) -> tuple:
    group = group if group is not None else dist.group.WORLD
    return group.group_name, tuple(dist.get_process_group_ranks(group))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _log(group, token) -> None:
    if _record is not None:
        _record.append((_group_key(group), token))


def _p2p_token(direction: str, me: int, peer: int, t: torch.Tensor) -> tuple:
    sender, receiver = (me, peer) if direction == "send" else (peer, me)
    return ("p2p", sender, receiver, _dtype(t), t.numel())


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.uint8:
        t.fill_(255)  # as bytes of any float dtype: NaN
    else:
        t.fill_(-1)


class _Deferred:
    """Completed at post; the result is withheld until wait() (see the module docstring)."""

    def __init__(self, works, received: list[torch.Tensor], sent: list[torch.Tensor]):
        for work in works:
            work.wait()
        self.results = [(t, t.clone()) for t in received]
        self.snapshots = [(t, t.clone()) for t in sent]
        for t in received:
            _poison(t)
        self.done = False

    def wait(self, *args, **kwargs) -> bool:
        if not self.done:
            self.done = True
            for t, snapshot in self.snapshots:
                if not torch.equal(t, snapshot):
                    raise RuntimeError("a send buffer was modified while its operation was in flight")
            for t, result in self.results:
                t.copy_(result)
        return True

    def is_completed(self) -> bool:
        return self.done


def install(record: bool = False, tag0: bool = False, deferred: bool = False) -> None:
    global _record
    if record:
        _record = []
    originals = {name: getattr(wire, name) for name in
                 ("all_gather_into", "all_reduce", "broadcast", "batch_p2p", "isend", "irecv", "all_gather_object")}
    me = dist.get_rank

    def all_gather_into(recv, send, group=None, async_op=True):
        _log(group, ("all_gather", _dtype(send), send.numel()))
        work = originals["all_gather_into"](recv, send, group, async_op)
        return _Deferred([work], [recv], [send]) if deferred and async_op else work

    def all_reduce(tensor, group=None, op=dist.ReduceOp.SUM, async_op=False):
        _log(group, ("all_reduce", _dtype(tensor), tensor.numel()))
        work = originals["all_reduce"](tensor, group, op, async_op)
        return _Deferred([work], [tensor], []) if deferred and async_op else work

    def broadcast(tensor, src, group=None, async_op=False):
        _log(group, ("broadcast", src, _dtype(tensor), tensor.numel()))
        work = originals["broadcast"](tensor, src, group, async_op)
        if deferred and async_op:
            return _Deferred([work], [], [tensor]) if src == me() else _Deferred([work], [tensor], [])
        return work

    def batch_p2p(ops, group=None):
        ops = [(op, t, peer, 0 if tag0 else tag) for op, t, peer, tag in ops]
        if ops:
            _log(group, ("batch", tuple(sorted(_p2p_token(op, me(), peer, t) for op, t, peer, _ in ops))))
        works = originals["batch_p2p"](ops, group)
        if deferred and works:
            return [_Deferred(works, [t for op, t, _, _ in ops if op == "recv"], [t for op, t, _, _ in ops if op == "send"])]
        return works

    def isend(tensor, peer, group=None, tag=0):
        _log(group, ("batch", (_p2p_token("send", me(), peer, tensor),)))
        work = originals["isend"](tensor, peer, group, 0 if tag0 else tag)
        return _Deferred([work], [], [tensor]) if deferred else work

    def irecv(tensor, peer, group=None, tag=0):
        _log(group, ("batch", (_p2p_token("recv", me(), peer, tensor),)))
        work = originals["irecv"](tensor, peer, group, 0 if tag0 else tag)
        return _Deferred([work], [tensor], []) if deferred else work

    def all_gather_object(out, obj, group=None):
        _log(group, ("all_gather_object",))
        return originals["all_gather_object"](out, obj, group)

    for fn in (all_gather_into, all_reduce, broadcast, batch_p2p, isend, irecv, all_gather_object):
        setattr(wire, fn.__name__, fn)


def install_from_env() -> None:
    flags = {name: bool(os.environ.get(env)) for name, env in
             (("record", RECORD_ENV), ("tag0", TAG0_ENV), ("deferred", DEFERRED_ENV))}
    if any(flags.values()) and not getattr(wire, "_checked", False):
        install(**flags)
        wire._checked = True


def recording() -> bool:
    return _record is not None


def take_record() -> list:
    """The operations since the last take: [(communicator, token)], JSON-friendly."""
    global _record
    if _record is None:
        return []
    out, _record = _record, []
    return [[list(group[0:1]) + [list(group[1])], list(token)] for group, token in out]


def check_order(records: dict) -> list[str]:
    """`records[rank]` = that rank's take_record(). Problems that NCCL would turn into a
    deadlock or mixed-up data: a communicator whose members issue different collective
    sequences, or a pair whose point-to-point messages (and the collectives around them)
    do not match in order. Returns the problems (empty: consistent)."""
    problems = []
    by_comm: dict = {}
    for rank, ops in records.items():
        for (name, members), token in ops:
            by_comm.setdefault((name, tuple(members)), {}).setdefault(rank, []).append(tuple(_freeze(token)))
    for (name, members), per_rank in by_comm.items():
        for rank in members:
            per_rank.setdefault(rank, [])
        for a in members:
            for b in members:
                if a >= b:
                    continue
                seq_a = _projection(per_rank[a], a, b)
                seq_b = _projection(per_rank[b], b, a)
                if seq_a != seq_b:
                    i = next((k for k, (x, y) in enumerate(zip(seq_a, seq_b)) if x != y), min(len(seq_a), len(seq_b)))
                    problems.append(f"communicator {name} {list(members)}: ranks {a} and {b} diverge at their "
                                    f"shared operation {i}: {seq_a[i:i + 1]} vs {seq_b[i:i + 1]} "
                                    f"({len(seq_a)} vs {len(seq_b)} operations)")
    return problems


def _freeze(x):
    return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


def _projection(ops: list, me: int, other: int) -> list:
    """What `me` issues that `other` takes part in: every collective of the communicator,
    and of each point-to-point batch only the messages between the two."""
    out = []
    for token in ops:
        if token[0] == "batch":
            mine = tuple(sorted(m for m in token[1] if {m[1], m[2]} == {me, other}))
            if mine:
                out.append(("p2p",) + mine)
        else:
            out.append(token)
    return out
