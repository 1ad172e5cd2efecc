"""Stale exchange: post a fresh tensor now, read what the peers posted one step ago.

A layer owns a *slot* (a name). Every step it calls the slot with its fresh tensor and a
flag saying whether this step is synchronous:

- sync: the exchange runs now and blocks; the caller gets the peers' fresh tensors. The
  result is also kept as the stale view for the next step, so the last synchronous step
  "posts" what the first stale step reads at no extra cost.
- stale: the caller gets the result of the *previous* step's exchange (waiting on its
  handle only now, one step after it was issued), and this step's tensor is posted
  asynchronously for the next step to read.

Two shapes of exchange exist: an all-gather among the members (uneven sizes are padded
on the wire and never seen by the caller) and a neighbour exchange with the previous and
next member by point-to-point.

Stale posts are bucketed (`comms.buckets`): the first stale step of a request runs slot by
slot (one operation per post; small coalesced all-gathers go as one collective when the
step ends, `flush`) and records the sequence of posts; every later stale step writes into
static buffers and launches a few bucketed operations. Synchronous steps always run slot
by slot: their results are needed at once. A stale view returned by a call is valid until
the exchange's next call (buffers are reused).

Under torch.compile (`parallel.patch.compiled`) the bucketed path is traced: writing into the
send views and reading the receive views become part of the graph, and only a bucket's
launch and its wait are opaque calls (graph breaks). The slot-by-slot path (`_run`) is
opaque as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import comms.wire as wire
from comms.buckets import BucketPlan, Post
from comms.stats import CommStats, nbytes



@dataclass
class _Pending:
    works: list
    build: Callable[[], object]
    posted_step: int
    keep_alive: tuple  # send buffers must outlive the asynchronous operation


class _Slot:
    def __init__(self, name: str, tag: int, kind: str):
        self.name = name
        self.tag = tag
        self.kind = kind  # what is exchanged, for the byte accounting
        self.pending: _Pending | None = None
        self.ready = None  # result of the last completed exchange
        self.entry = None  # its place in a bucket, when its last post went there
        self.read_block = None  # (block, index, key) when the last stale view was read from a bucket block

    @property
    def has_view(self) -> bool:
        return self.pending is not None or self.ready is not None or self.entry is not None


class StaleExchange:
    """Exchanges among the members of one process group (e.g. the ranks sharing a latent)."""

    def __init__(self, group, ranks: Sequence[int], rank: int, stats: CommStats):
        self.group = group
        self.ranks = list(ranks)
        self.index = self.ranks.index(rank)
        self.size = len(self.ranks)
        self.stats = stats
        self._slots: dict[str, _Slot] = {}
        self._bucket: list = []  # (slot, padded flat tensor, shapes) staged for flush()
        self.bucket_bytes: int | None = None  # bytes per phase; None: `phases` equal phases
        self.phases = 3
        self.bucketing = True  # False: every stale post is its own operation
        self._recording: list[Post] = []  # the posts of the first stale step
        self._plan: BucketPlan | None = None

    def configure(self, bucket_mb: float | None) -> None:
        """Per request: None buckets a step's posts into three phases of about equal
        bytes, a positive number into phases of about that many MB, 0 not at all."""
        self.bucketing = bucket_mb != 0
        self.bucket_bytes = None if bucket_mb is None else int(bucket_mb * 2**20)

    # -- bookkeeping -------------------------------------------------------------
    def reset(self) -> None:
        """Forget every stale view (a new request starts with synchronous steps)."""
        for slot in self._slots.values():
            if slot.pending is not None:
                self._wait(slot.pending)
        if self._plan is not None:
            self._plan.wait_all()
        self._slots = {}
        self._bucket = []
        self._recording = []
        self._plan = None

    def end_request(self) -> None:
        """Called once every operation of a request has completed (hook for subclasses)."""

    def _slot(self, name: str, kind: str = "other") -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            # Registration order is the same on every member, so tags agree.
            slot = self._slots[name] = _Slot(name, tag=len(self._slots) + 1, kind=kind)
        return slot

    def prime(self, name: str, view, kind: str = "other") -> None:
        """Make `view` what the next stale call of slot `name` returns, as if it had been
        exchanged in this step: lets a strategy switch exchange shape after warm-up (the
        last synchronous all-gather already holds what the first stale step needs)."""
        slot = self._slot(name, kind)
        if slot.pending is not None:
            self._fetch(slot)
        slot.ready = view

    def _wait(self, pending: _Pending):
        device = next((t.device for t in pending.keep_alive if t is not None), None)
        with self.stats.waiting(device):
            for work in pending.works:
                work.wait()
        return pending.build()

    @torch.compiler.disable  # a wait on a handle: opaque to a compiled denoiser
    def _fetch(self, slot: _Slot):
        if slot.pending is not None:
            self.stats.event("wait", slot.name, slot.pending.posted_step)
            slot.ready = self._wait(slot.pending)
            slot.pending = None
        return slot.ready

    @torch.compiler.disable  # blocking or issuing: opaque to a compiled denoiser (a graph break)
    def _run(self, slot: _Slot, issue: Callable[[], _Pending], sync: bool):
        if sync or not slot.has_view:
            # Nothing stale to read yet (first step): exchange fresh and keep the result.
            if slot.pending is not None:
                self._fetch(slot)
            pending = issue()
            self.stats.event("sync", slot.name, pending.posted_step)
            slot.ready = self._wait(pending)
            return slot.ready
        stale = self._fetch(slot)
        slot.ready = None  # the caller holds it now; keep one full buffer per slot, not two
        slot.pending = issue()
        self.stats.event("post", slot.name, slot.pending.posted_step)
        return stale

    # -- bucketed stale posts ----------------------------------------------------------
    def _record(self, post: Post) -> None:
        if self.bucketing and self._plan is None:
            self._recording.append(post)

    def _read_stale(self, slot: _Slot):
        """The slot's stale view, wherever its last post went; then the slot is empty."""
        if slot.pending is not None or slot.ready is not None:
            view = self._fetch(slot)
            slot.read_block = None
        else:
            slot.entry.bucket.wait_if_busy()
            view = slot.entry.recv
            slot.read_block = slot.entry.block
        slot.ready, slot.entry = None, None
        return view

    def _bucketed(self, slot: _Slot):
        """(entry, stale view) of a stale post in a bucketed step, or None when this step
        runs slot by slot."""
        plan = self._plan
        if plan is None or not slot.has_view:
            return None
        plan.launch_due()  # the previous slot's caller is done with its view
        entry = plan.expect(slot)
        stale = self._read_stale(slot)
        entry.bucket.wait_if_busy()  # its send buffer is free again
        slot.entry = entry
        return entry, stale

    def send_view(self, name: str) -> torch.Tensor | None:
        """Where slot `name`'s next stale post will be sent from, when it goes into a
        bucket: a caller that computes its tensor straight into this view saves a copy
        (then passes that very view object to the call). None when the post is not bucketed."""
        plan = self._plan
        slot = self._slots.get(name)
        if plan is None or slot is None or plan.cursor >= len(plan.sequence):
            return None
        entry = plan.sequence[plan.cursor]
        if entry.post.slot is not slot or entry.post.wire != "gather":
            return None
        entry.bucket.wait_if_busy()  # the buffer is free once last step's operation completed
        return entry.send[0]

    def stale_block(self, name: str):
        """(block, index, key) when slot `name`'s stale view just read came from a bucket
        where the slots of its kind, dtype and shape lie side by side: `block` (members, n,
        ...) holds all n of them (valid until their bucket launches again), `key` names the
        block (equal in every step of a request); else None."""
        slot = self._slots.get(name)
        return None if slot is None else slot.read_block

    def _build_plan(self) -> None:
        posts, self._recording = self._recording, []
        if not posts or self._plan is not None:
            return
        if len({p.slot.name for p in posts}) != len(posts):
            self.bucketing = False  # a slot posted twice in a step: keep slot by slot
            return
        weights = self._agree([p.weight() for p in posts], posts[0].device)
        self._plan = BucketPlan(self, posts, weights, self.bucket_bytes, self.phases)

    def _agree(self, weights: list[int], device) -> list[int]:
        """The element-wise maximum over the members (one collective, once per request)."""
        t = torch.tensor(weights, dtype=torch.int64, device=device)
        self._wire_max(t)
        return t.tolist()

    # -- all-gather ----------------------------------------------------------------
    def all_gather(
        self,
        name: str,
        tensor: torch.Tensor,
        shapes: Sequence[torch.Size],
        sync: bool,
        coalesce: bool = False,
        kind: str = "other",
        stacked: bool = False,
    ):
        """Every member's tensor, in member order; `shapes[j]` is member j's shape.
        `stacked` (equal shapes): one (members, ...) tensor instead of a list."""
        if sync:  # blocking: one opaque call under torch.compile, taken before the name is read
            return self._all_gather_blocking(name, tensor, shapes, sync, coalesce, kind, stacked)
        return self._all_gather(name, tensor, shapes, sync, coalesce, kind, stacked)

    def _all_gather(self, name, tensor, shapes, sync, coalesce, kind, stacked):
        shapes = [torch.Size(s) for s in shapes]
        if tuple(tensor.shape) != tuple(shapes[self.index]):
            raise ValueError(f"slot {name}: tensor {tuple(tensor.shape)} != declared {tuple(shapes[self.index])}")
        slot = self._slot(name, kind)
        slot.read_block = None
        if not sync:
            bucketed = self._bucketed(slot)
            if bucketed is not None:
                entry, stale = bucketed
                if tensor is not entry.send[0]:  # computed elsewhere, not straight into the bucket
                    entry.send[0].copy_(tensor)
                self._plan.written(entry)
                if stacked:
                    return entry.stacked if entry.stacked is not None and stale is entry.recv else torch.stack(stale)
                return stale
            if slot.has_view:
                self._record(Post(slot, "gather", tensor.dtype, tensor.device, shapes=shapes))
        if coalesce and not sync and slot.has_view:
            stale = self._fetch(slot)
            slot.ready = None
            self._bucket.append((slot, tensor.detach().reshape(-1).clone(), shapes))
            self.stats.event("stage", slot.name, self.stats.step)
        else:
            stale = self._run(slot, lambda: self._issue_all_gather([tensor], [shapes], [slot.kind])[0], sync)
        return torch.stack(list(stale)) if stacked else stale

    # Under torch.compile a name-dependent traced frame would be compiled once per slot.
    _all_gather_blocking = torch.compiler.disable(_all_gather)

    def _issue_all_gather(self, tensors: list[torch.Tensor], shapes_list: list[list[torch.Size]], kinds: list[str]):
        """One all-gather carrying several tensors; returns one _Pending per tensor."""
        widths = [max(s.numel() for s in shapes) for shapes in shapes_list]
        total = sum(widths)
        ref = tensors[0]
        send = torch.zeros(total, dtype=ref.dtype, device=ref.device)
        offset = 0
        for t, w in zip(tensors, widths):
            flat = t.detach().reshape(-1)
            send[offset : offset + flat.numel()] = flat
            offset += w
        recv = torch.empty(self.size * total, dtype=ref.dtype, device=ref.device)
        work = self._wire_all_gather(recv, send)
        elem = ref.element_size()
        self.stats.record_op(0, 0)  # one operation; its bytes are counted per kind below
        for shapes, kind in zip(shapes_list, kinds):
            mine = shapes[self.index].numel() * elem * (self.size - 1)
            others = sum(s.numel() for j, s in enumerate(shapes) if j != self.index) * elem
            self.stats.record_bytes(mine, others, kind)

        pendings = []
        offset = 0
        rows = recv.view(self.size, total)
        for shapes, w in zip(shapes_list, widths):
            def build(off=offset, shapes=shapes):
                return [rows[j, off : off + s.numel()].view(s) for j, s in enumerate(shapes)]

            pendings.append(_Pending([work], build, self.stats.step, (send, recv)))
            offset += w
        return pendings

    def flush(self) -> None:
        """End of a step: launch what is still due (bucketed steps), or send the staged
        (coalesced) stale posts as one collective per dtype and, after the first stale
        step, build the buckets from what it posted."""
        if self._plan is not None:
            self._plan.end_step()
            return
        self._flush_coalesced()
        self._build_plan()

    def _flush_coalesced(self) -> None:
        by_dtype: dict = {}
        for item in self._bucket:
            by_dtype.setdefault(item[1].dtype, []).append(item)
        self._bucket = []
        for items in by_dtype.values():
            pendings = self._issue_all_gather(
                [t for _, t, _ in items], [s for _, _, s in items], [slot.kind for slot, _, _ in items]
            )
            for (slot, _, _), pending in zip(items, pendings):
                slot.pending = pending
                self.stats.event("post", slot.name, pending.posted_step)

    # -- the wire: the only two calls into torch.distributed ------------------------
    def _wire_all_gather(self, recv: torch.Tensor, send: torch.Tensor):
        """Start an all-gather of `send` (equal sizes) into `recv`; returns its work handle."""
        return wire.all_gather_into(recv, send, group=self.group)

    def _wire_max(self, tensor: torch.Tensor) -> None:
        """Element-wise maximum over the members, in place (blocking)."""
        wire.all_reduce(tensor, group=self.group, op=wire.dist.ReduceOp.MAX)

    def _wire_p2p(self, ops: list) -> list:
        """Start a batch of point-to-point ops, each ("send" | "recv", tensor, peer, tag)."""
        return wire.batch_p2p(ops, self.group)

    # -- neighbours ----------------------------------------------------------------
    def neighbours(
        self,
        name: str,
        like: torch.Tensor,
        to_prev: torch.Tensor | None,
        to_next: torch.Tensor | None,
        from_prev_shape: torch.Size | None,
        from_next_shape: torch.Size | None,
        sync: bool,
        kind: str = "other",
    ):
        """Send to the previous/next member and receive theirs: (from_prev, from_next).

        Shapes are agreed in advance by both sides (they follow from the band plan), so
        the receive buffers need no handshake. Members at the ends pass None. Received
        tensors take the dtype and device of `like`.
        """
        args = (name, like, to_prev, to_next, from_prev_shape, from_next_shape, sync, kind)
        return self._neighbours_blocking(*args) if sync else self._neighbours(*args)

    def _neighbours(self, name, like, to_prev, to_next, from_prev_shape, from_next_shape, sync, kind):
        slot = self._slot(name, kind)
        if not sync:
            bucketed = self._bucketed(slot)
            if bucketed is not None:
                entry, stale = bucketed
                for view, t in zip(entry.send, (to_prev, to_next)):
                    if view is not None:
                        view.copy_(t)
                self._plan.written(entry)
                return stale
            if slot.has_view:
                def message(t, exists):
                    return torch.Size(t.shape) if exists and t is not None and t.numel() > 0 else None

                def expected(shape, exists):
                    return torch.Size(shape) if exists and shape is not None and torch.Size(shape).numel() > 0 else None

                has_prev, has_next = self.index > 0, self.index < self.size - 1
                self._record(Post(slot, "p2p", like.dtype, like.device,
                                  to_prev=message(to_prev, has_prev), to_next=message(to_next, has_next),
                                  from_prev=expected(from_prev_shape, has_prev),
                                  from_next=expected(from_next_shape, has_next)))

        def issue() -> _Pending:
            ops, sent, received = [], 0, 0
            ref = like
            recv_prev = recv_next = None
            send_prev = send_next = None
            if self.index > 0:
                peer = self.ranks[self.index - 1]
                if from_prev_shape is not None and from_prev_shape.numel() > 0:
                    recv_prev = torch.empty(from_prev_shape, dtype=ref.dtype, device=ref.device)
                    ops.append(("recv", recv_prev, peer, slot.tag))
                    received += nbytes(recv_prev)
                if to_prev is not None and to_prev.numel() > 0:
                    send_prev = to_prev.detach().contiguous()
                    ops.append(("send", send_prev, peer, slot.tag))
                    sent += nbytes(send_prev)
            if self.index < self.size - 1:
                peer = self.ranks[self.index + 1]
                if to_next is not None and to_next.numel() > 0:
                    send_next = to_next.detach().contiguous()
                    ops.append(("send", send_next, peer, slot.tag))
                    sent += nbytes(send_next)
                if from_next_shape is not None and from_next_shape.numel() > 0:
                    recv_next = torch.empty(from_next_shape, dtype=ref.dtype, device=ref.device)
                    ops.append(("recv", recv_next, peer, slot.tag))
                    received += nbytes(recv_next)
            works = self._wire_p2p(ops) if ops else []
            if ops:
                self.stats.record_op(sent, received, kind=slot.kind)  # one batch: one operation
            return _Pending(works, lambda: (recv_prev, recv_next), self.stats.step, (send_prev, send_next))

        return self._run(slot, issue, sync)

    _neighbours_blocking = torch.compiler.disable(_neighbours)  # see _all_gather_blocking
