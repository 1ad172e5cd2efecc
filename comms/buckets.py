"""Bucketed stale posts on static buffers: a few operations per step instead of one per layer.

A stale step posts every slot's fresh tensor for the next step. Posting each one as its
own operation costs a launch, fresh buffers and a copy per layer (about 110 operations per
SDXL step). Instead, the first stale step of a request runs slot by slot and *records*
the sequence of posts; from then on the sequence is cut into a few *phases* of about equal
bytes, in forward order, and each phase owns at most two buckets:

- a gather bucket (an all-gather among the members: patch K/V, GroupNorm statistics);
- a neighbour bucket (one batched point-to-point with the previous and next member: halo
  rows, pcpp's boundary K/V).

Each bucket has flat byte buffers allocated once per request; a slot's tensor is written
into its typed view of the send buffer, and when the phase's last slot has written, the
bucket is launched (at the exchange's next call, so the last slot's caller has consumed
its stale view first: receive buffers are reused, a stale view is valid until then).
Dtypes mix freely (float32 statistics beside bf16 K/V): buffers are bytes, each slot's
region 16-byte aligned and viewed in its own dtype.

Every member must cut the sequence at the same slots and size every region alike, so the
per-slot byte weights are agreed once (an all-reduce of the maximum) when the plan is
built; the slot sequence itself is the same on every member (the same model runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALIGN = 16  # bytes: every region starts where any dtype may view it
P2P_TAG_BASE = 1 << 20  # bucket tags sit above the per-slot tags of the slot-by-slot path


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _typed(flat: torch.Tensor, offset: int, shape, dtype) -> torch.Tensor:
    n = _nbytes(shape, dtype)
    return flat[offset : offset + n].view(dtype).view(shape)


@dataclass
class Post:
    """One slot's post as recorded in the first stale step."""

    slot: object
    wire: str  # "gather" or "p2p"
    dtype: torch.dtype
    device: torch.device
    shapes: list | None = None  # gather: every member's shape
    to_prev: torch.Size | None = None  # p2p: the four message shapes (None: no message)
    to_next: torch.Size | None = None
    from_prev: torch.Size | None = None
    from_next: torch.Size | None = None

    def weight(self) -> int:
        """Bytes used to cut phases (made equal on every member by `agree`)."""
        if self.wire == "gather":
            return max(_nbytes(s, self.dtype) for s in self.shapes)
        return max([0] + [_nbytes(s, self.dtype) for s in (self.to_prev, self.to_next, self.from_prev, self.from_next)
                          if s is not None])


@dataclass
class Entry:
    """A slot's place in its bucket: typed views written and read in every step."""

    post: Post
    bucket: "Bucket"
    send: list = field(default_factory=list)  # gather: [own view]; p2p: [to_prev view, to_next view]
    recv: object = None  # gather: [member views]; p2p: (from_prev view, from_next view)
    stacked: torch.Tensor | None = None  # gather of equal shapes: every member's as one (m, ...) view
    block: tuple | None = None  # (view (m, n, ...) of the n alike entries laid out together, this one's
    #                             index, a key naming the block: the same every step of a request)


class Bucket:
    def __init__(self, exchange, index: int):
        self.exchange = exchange
        self.index = index
        self.entries: list[Entry] = []
        self.work: list = []  # handles of the launch in flight
        self.busy = False  # launched and not waited for (a plain flag: compiled code reads it)
        self.written = 0
        self.posted_step = -1

    def wait_if_busy(self) -> None:
        """Wait for the launch in flight, if any. The check is traced by torch.compile;
        only an actual wait is an opaque call."""
        if self.busy:
            self.wait()

    @torch.compiler.disable  # a wait on a work handle: a graph break in a compiled denoiser
    def wait(self, trace: bool = True) -> None:
        self.busy = False
        if self.work:
            works, self.work = self.work, []
            with self.exchange.stats.waiting(self.device):
                for work in works:
                    work.wait()
            if trace and self.exchange.stats.trace_enabled:
                for entry in self.entries:
                    self.exchange.stats.event("wait", entry.post.slot.name, self.posted_step)


class GatherBucket(Bucket):
    """One all-gather of a flat byte buffer; member j's regions are row j of the result."""

    def __init__(self, exchange, index: int, posts: list[Post], device):
        super().__init__(exchange, index)
        self.device = device
        widths = [_aligned(p.weight()) for p in posts]
        self.width = sum(widths)
        self.send = torch.zeros(self.width, dtype=torch.uint8, device=device)
        self.recv = torch.zeros(exchange.size * self.width, dtype=torch.uint8, device=device)
        rows = self.recv.view(exchange.size, self.width)
        me = exchange.index
        self.bytes_by_kind: dict = {}
        # Entries of one kind, dtype and shape (the same on every member) are laid out side by
        # side, so a layer family can read all of theirs as one block (GroupNorm statistics).
        def alike(p):
            equal = all(s == p.shapes[0] for s in p.shapes)
            return (p.slot.kind, p.dtype, tuple(p.shapes[0])) if equal else ("", id(p))
        groups: dict = {}
        for i, post in enumerate(posts):
            groups.setdefault(alike(post), []).append(i)
        offsets, offset = {}, 0
        for members in groups.values():
            for i in members:
                offsets[i] = offset
                offset += widths[i]
        self.entries = [Entry(p, self) for p in posts]  # in posting order
        for key, members in groups.items():
            first, n, w = offsets[members[0]], len(members), widths[members[0]]
            if n > 1 and key[0] and _nbytes(key[2], key[1]) == w:  # no padding between them
                block = rows[:, first : first + n * w].view(key[1]).view(exchange.size, n, *key[2])
                for k, i in enumerate(members):
                    self.entries[i].block = (block, k, (index, first))
        for i, (post, entry) in enumerate(zip(posts, self.entries)):
            offset = offsets[i]
            entry.send = [_typed(self.send, offset, post.shapes[me], post.dtype)]
            entry.recv = [_typed(rows[j], offset, s, post.dtype) for j, s in enumerate(post.shapes)]
            if all(s == post.shapes[0] for s in post.shapes):
                n = _nbytes(post.shapes[0], post.dtype)
                entry.stacked = rows[:, offset : offset + n].view(post.dtype).view(exchange.size, *post.shapes[0])
            mine = _nbytes(post.shapes[me], post.dtype)
            others = sum(_nbytes(s, post.dtype) for j, s in enumerate(post.shapes) if j != me)
            pair = self.bytes_by_kind.setdefault(post.slot.kind, [0, 0])
            pair[0] += mine * (exchange.size - 1)
            pair[1] += others

    def launch(self) -> None:
        self.work = [self.exchange._wire_all_gather(self.recv, self.send)]
        self.busy = True


class NeighbourBucket(Bucket):
    """One batch of point-to-point messages with the previous and the next member."""

    def __init__(self, exchange, index: int, posts: list[Post], device):
        super().__init__(exchange, index)
        self.device = device
        sizes = {d: sum(_aligned(_nbytes(getattr(p, d), p.dtype)) for p in posts if getattr(p, d) is not None)
                 for d in ("to_prev", "to_next", "from_prev", "from_next")}
        buf = {d: torch.zeros(n, dtype=torch.uint8, device=device) for d, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        self.bytes_by_kind = {}

        def region(post, d):
            shape = getattr(post, d)
            if shape is None:
                return None
            view = _typed(buf[d], offsets[d], shape, post.dtype)
            offsets[d] += _aligned(_nbytes(shape, post.dtype))
            return view

        for post in posts:
            entry = Entry(post, self)
            entry.send = [region(post, "to_prev"), region(post, "to_next")]
            entry.recv = (region(post, "from_prev"), region(post, "from_next"))
            pair = self.bytes_by_kind.setdefault(post.slot.kind, [0, 0])
            pair[0] += sum(_nbytes(s, post.dtype) for s in (post.to_prev, post.to_next) if s is not None)
            pair[1] += sum(_nbytes(s, post.dtype) for s in (post.from_prev, post.from_next) if s is not None)
            self.entries.append(entry)
        # Posting order inside a batch does not matter (NCCL groups it, gloo matches tags).
        ex, tag = exchange, P2P_TAG_BASE + index
        self.ops = []
        if ex.index > 0:
            prev = ex.ranks[ex.index - 1]
            self.ops += [("recv", buf["from_prev"], prev, tag), ("send", buf["to_prev"], prev, tag)]
        if ex.index < ex.size - 1:
            nxt = ex.ranks[ex.index + 1]
            self.ops += [("send", buf["to_next"], nxt, tag), ("recv", buf["from_next"], nxt, tag)]
        self.ops = [op for op in self.ops if op[1].numel() > 0]

    def launch(self) -> None:
        self.work = list(self.exchange._wire_p2p(self.ops)) if self.ops else []
        self.busy = bool(self.work)


class BucketPlan:
    """The buckets of one request, in launch order, and the cursor of the current step."""

    def __init__(self, exchange, posts: list[Post], weights: list[int], target_bytes: int | None, phases: int):
        device = posts[0].device
        total = sum(weights)
        target = target_bytes if target_bytes else max(1, -(-total // max(1, phases)))
        cuts, acc = [], 0
        for i, w in enumerate(weights):
            acc += w
            if acc >= target and i < len(posts) - 1:
                cuts.append(i + 1)
                acc = 0
        bounds = [0] + cuts + [len(posts)]
        self.buckets: list[Bucket] = []
        self.sequence: list[Entry] = []  # every post of a step, in order
        for lo, hi in zip(bounds, bounds[1:]):
            phase = posts[lo:hi]
            by_wire = {"gather": [p for p in phase if p.wire == "gather"], "p2p": [p for p in phase if p.wire == "p2p"]}
            made = {}
            for wire, cls in (("gather", GatherBucket), ("p2p", NeighbourBucket)):
                if by_wire[wire]:
                    made[wire] = cls(exchange, len(self.buckets), by_wire[wire], device)
                    self.buckets.append(made[wire])
            iters = {w: iter(b.entries) for w, b in made.items()}
            self.sequence.extend(next(iters[p.wire]) for p in phase)
        self.cursor = 0
        self.due: Bucket | None = None  # full, launched at the exchange's next call

    def launch_due(self) -> None:
        if self.due is not None:
            bucket, self.due = self.due, None
            self._launch(bucket)

    @torch.compiler.disable  # a launch: a graph break in a compiled denoiser
    def _launch(self, bucket: Bucket) -> None:
        ex = bucket.exchange
        bucket.posted_step = ex.stats.step
        bucket.launch()
        ex.stats.record_op(0, 0)  # one operation; its bytes are counted per kind
        for kind, (sent, received) in bucket.bytes_by_kind.items():
            ex.stats.record_bytes(sent, received, kind)
        if ex.stats.trace_enabled:
            for entry in bucket.entries:
                ex.stats.event("post", entry.post.slot.name, bucket.posted_step)

    def written(self, entry: Entry) -> None:
        bucket = entry.bucket
        bucket.written += 1
        if bucket.written == len(bucket.entries):
            bucket.written = 0
            self.due = bucket

    def end_step(self) -> None:
        self.launch_due()
        if self.cursor not in (0, len(self.sequence)):
            missing = self.sequence[self.cursor].post.slot.name
            raise RuntimeError(f"stale exchange: the step ended before slot {missing!r} posted "
                               "(the layers' call order changed inside one request)")
        self.cursor = 0

    def wait_all(self) -> None:
        """The request's end: wait for what is in flight. A bucket that filled but was not
        launched yet (a rank failing mid-step) is dropped, never launched here: its peers
        may not be at the same point."""
        self.due = None
        for bucket in self.buckets:
            bucket.wait(trace=False)  # the request's end, not a stale read

    def expect(self, slot) -> Entry:
        if self.cursor >= len(self.sequence) or self.sequence[self.cursor].post.slot is not slot:
            want = self.sequence[self.cursor].post.slot.name if self.cursor < len(self.sequence) else "none"
            raise RuntimeError(
                f"stale exchange: slot {slot.name!r} posted where the recorded sequence has {want!r} "
                "(the layers' call order changed inside one request)")
        self.cursor += 1
        return self.sequence[self.cursor - 1]
