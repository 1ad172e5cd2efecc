"""Isolated ranks: rank r of an N-rank request run alone, its exchanges served locally.

On a machine where every rank shares a few cores, a parallel run's wall clock shows
overheads, not what N devices would do. An isolated rank does exactly one real rank's
work (the same layers, hooks, bands, slots, buffers and accounting) in one process with
the whole machine: only the wire is different. `IsolatedExchange` is a `StaleExchange`
whose two wire calls complete at once and fill the receive buffers locally:
- from a replay of what a real N-rank run received (`RecordingExchange` keeps it when
  `RECORD_ENV` names a directory), so the isolated rank computes the very same numbers
  (its own part of an all-gather is always what it computed itself);
- or, without a replay, with fixed data of the right shape: an all-gather delivers this
  rank's own payload in every member's place, point-to-point receives are zeros (compute
  time does not depend on the values; both are finite, so no NaN slows a kernel).
The layers never know: the exchange layer is the one place that does.
"""

from __future__ import annotations

import os

import torch

from comms.exchange import StaleExchange

RECORD_ENV = "TESSERA_RECORD_EXCHANGES"  # a directory: real ranks save what they receive


class _Done:
    """The handle of an operation that completed when it was issued."""

    def wait(self) -> bool:
        return True


def _recording_path(directory: str, rank: int, label: str) -> str:
    return os.path.join(directory, f"rank{rank}.{label}.pt")


class RecordingExchange(StaleExchange):
    """A real exchange that also keeps every buffer it receives, in issue order."""

    def __init__(self, group, ranks, rank: int, stats, label: str, directory: str):
        super().__init__(group, ranks, rank, stats)
        self.path = _recording_path(directory, rank, label)
        self.received: list[torch.Tensor] = []

    def _wire_all_gather(self, recv, send):
        work = super()._wire_all_gather(recv, send)
        self.received.append(recv)
        return work

    def _wire_max(self, tensor):
        super()._wire_max(tensor)
        self.received.append(tensor)

    def _wire_p2p(self, ops):
        works = super()._wire_p2p(ops)
        self.received.extend(t for op, t, _, _ in ops if op == "recv")
        return works

    def end_request(self) -> None:
        """Save what this request received (every operation has completed by now)."""
        torch.save([t.detach().cpu() for t in self.received], self.path)
        self.received = []


class IsolatedExchange(StaleExchange):
    """The exchanges of one rank of `ranks`, with no peers: see the module docstring."""

    def __init__(self, ranks, rank: int, stats, replay: list[torch.Tensor] | None = None):
        super().__init__(None, ranks, rank, stats)
        self.replay = replay
        self._next = 0  # every request replays the recording from its start

    def end_request(self) -> None:
        if self.replay is not None and self._next != len(self.replay):
            done, self._next = self._next, 0
            raise RuntimeError(f"the isolated rank issued {done} operations, the recorded run {len(self.replay)}")
        self._next = 0

    def _replayed(self, recv: torch.Tensor) -> bool:
        if self.replay is None:
            return False
        if self._next >= len(self.replay):
            raise RuntimeError("the replay ran out: the isolated rank issued more operations than the recorded run")
        data = self.replay[self._next]
        self._next += 1
        if data.shape != recv.shape:
            raise RuntimeError(f"replayed buffer {tuple(data.shape)} != issued {tuple(recv.shape)}: not the recorded run")
        recv.copy_(data)
        return True

    def _wire_all_gather(self, recv, send):
        rows = recv.view(self.size, -1)
        if self._replayed(recv):
            rows[self.index].copy_(send)  # this rank's own part is what it computed now
        else:
            rows.copy_(send)
        return _Done()

    def _wire_max(self, tensor):
        self._replayed(tensor)  # without a replay: this rank's own values

    def _wire_p2p(self, ops):
        for op, tensor, _, _ in ops:
            if op == "recv" and not self._replayed(tensor):
                tensor.zero_()
        return [_Done()]


def exchange_factory(replay_dir: str | None = None, isolated: bool = False):
    """`make(group, ranks, rank, stats, label)` for a PatchContext's exchanges: real ones
    (recording when RECORD_ENV is set), or isolated ones (replaying `replay_dir` if given)."""
    if isolated:
        def make(group, ranks, rank, stats, label):
            replay = torch.load(_recording_path(replay_dir, rank, label)) if replay_dir else None
            return IsolatedExchange(ranks, rank, stats, replay)

        return make
    directory = os.environ.get(RECORD_ENV)
    if directory:
        return lambda group, ranks, rank, stats, label: RecordingExchange(group, ranks, rank, stats, label, directory)
    return lambda group, ranks, rank, stats, label: StaleExchange(group, ranks, rank, stats)
