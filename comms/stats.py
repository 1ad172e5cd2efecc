"""Byte, operation and wait accounting, per rank and per denoising step.

Bytes are payload bytes counted when an operation is issued, padding excluded. For an
all-gather a rank *sends* its own payload to each of the other members and *receives*
every other member's payload; for point-to-point the numbers are exact. Bytes are also
split by *kind* (what the layer exchanges: "kv", "halo", "gn", "output", ...), so a
strategy's attention traffic can be compared with another's.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StepStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    comm_wait_s: float = 0.0
    by_kind: dict = field(default_factory=dict)  # kind -> [bytes sent, bytes received]

    def add(self, bytes_sent: int, bytes_received: int, kind: str) -> None:
        if not (bytes_sent or bytes_received):
            return
        self.bytes_sent += int(bytes_sent)
        self.bytes_received += int(bytes_received)
        pair = self.by_kind.setdefault(kind, [0, 0])
        pair[0] += int(bytes_sent)
        pair[1] += int(bytes_received)

    def as_dict(self) -> dict:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "collectives": self.collectives,
            "comm_wait_s": self.comm_wait_s,
            "bytes_by_kind": {k: {"sent": s, "received": r} for k, (s, r) in sorted(self.by_kind.items())},
        }


@dataclass
class CommStats:
    """Counters of one rank. `step` is set by the caller (the denoising loop)."""

    step: int = 0
    steps: dict = field(default_factory=dict)
    trace_enabled: bool = False
    trace: list = field(default_factory=list)
    _cuda_waits: list = field(default_factory=list)  # (step, start event, end event)

    def _current(self) -> StepStats:
        return self.steps.setdefault(self.step, StepStats())

    def record_op(self, bytes_sent: int, bytes_received: int, ops: int = 1, kind: str = "other") -> None:
        cur = self._current()
        cur.add(bytes_sent, bytes_received, kind)
        cur.collectives += ops

    def record_bytes(self, bytes_sent: int, bytes_received: int, kind: str) -> None:
        """Bytes of an operation already counted (one collective carrying several kinds)."""
        self._current().add(bytes_sent, bytes_received, kind)

    @contextmanager
    def waiting(self, device=None):
        """Time spent waiting on communication. On CUDA, `work.wait()` only makes the
        compute stream wait, so the stall is measured on the stream with events and
        resolved after the request (`resolve_cuda_waits`)."""
        if device is not None and device.type == "cuda":
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._cuda_waits.append((self.step, start, end))
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._current().comm_wait_s += time.perf_counter() - start

    def resolve_cuda_waits(self) -> None:
        """Add the stream stalls recorded on CUDA (call after the device synchronised)."""
        for step, start, end in self._cuda_waits:
            self.steps.setdefault(step, StepStats()).comm_wait_s += start.elapsed_time(end) / 1000.0
        self._cuda_waits = []

    def event(self, kind: str, slot: str, posted_step: int | None = None) -> None:
        """Trace of posts and waits, used to prove that stale exchanges overlap steps."""
        if self.trace_enabled:
            self.trace.append(
                {"event": kind, "slot": slot, "step": self.step, "posted_step": posted_step}
            )

    def reset(self, trace: bool = False) -> None:
        self.step = 0
        self.steps = {}
        self.trace = []
        self.trace_enabled = trace
        self._cuda_waits = []

    def totals(self) -> StepStats:
        out = StepStats()
        for s in self.steps.values():
            for kind, (sent, received) in s.by_kind.items():
                out.add(sent, received, kind)
            out.collectives += s.collectives
            out.comm_wait_s += s.comm_wait_s
        return out

    def per_step(self) -> list[dict]:
        return [dict(step=k, **v.as_dict()) for k, v in sorted(self.steps.items())]


def nbytes(t) -> int:
    return t.numel() * t.element_size()
