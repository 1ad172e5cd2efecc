"""Local launcher: N worker processes on this machine, driven from the caller's process.

The parent hosts the rendezvous store (so it outlives any rank), spawns the ranks, and
watches them: a rank that raises or dies fails the pending request within seconds with
the rank and the cause, and the remaining ranks are terminated.
"""

from __future__ import annotations

import datetime
import queue
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from launch.worker import RankFailedError, worker_main

PEER_STOPPED_EXIT = 3  # comms.failure.EXIT_CODE: a rank that stopped because a peer failed
START_TIMEOUT_S = 600.0


class LocalLauncher:
    def __init__(self, model, parallel, world_size: int, device=None, dtype=None):
        self.world_size = world_size
        self._store = dist.TCPStore(
            "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=parallel.comm_timeout_s),
        )
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._requests = [ctx.Queue() for _ in range(world_size)]
        self._stop = ctx.Event()  # streams: the caller stopped consuming
        self._consumed = ctx.Value("i", 0)  # streams: chunks the caller has taken
        self._procs = [
            ctx.Process(
                target=worker_main,
                args=(rank, world_size, self._store.port, model, parallel, device, dtype, self._requests[rank], self._results,
                      (self._stop, self._consumed)),
                name=f"tessera-rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.closed = False
        self.last_reports: list = []  # every rank's report of the last stream
        ready = self._collect("ready", START_TIMEOUT_S)
        self.info = ready[0]

    def _check_running(self) -> None:
        if self.closed:
            raise RankFailedError("this engine's ranks are stopped; call engine.restart() or make a new engine")

    def run(self, request):
        self._check_running()
        for q in self._requests:
            q.put(request)
        return self._collect("ok", None)[0]

    def stream(self, request):
        """Yield (chunk, frames, seconds) as the decoding rank sends them; afterwards
        `last_reports` holds every rank's report. Closing the generator early stops the
        pipeline (rank 0 starts no new chunk, the rest drain) and waits for every rank."""
        self._check_running()
        self._stop.clear()
        self._consumed.value = 0
        self.last_reports = []
        for q in self._requests:
            q.put(request)
        done: dict = {}
        try:
            while len(done) < self.world_size:
                kind, rank, payload = self._next_message()
                if kind == "frames":
                    yield payload
                    self._consumed.value += 1
                elif kind == "ok":
                    done[rank] = payload
        finally:
            if len(done) < self.world_size and not self.closed:
                self._stop.set()  # stopped early: let the pipeline drain, discard its frames
                while len(done) < self.world_size:
                    kind, rank, payload = self._next_message()
                    if kind == "ok":
                        done[rank] = payload
            if len(done) == self.world_size:
                self.last_reports = [done[r] for r in sorted(done)]

    def _next_message(self, deadline: float | None = None, waiting_for: str = "a result"):
        """The next result message; fails fast on an error, a dead rank or the deadline."""
        while True:
            try:
                kind, rank, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if p.exitcode is not None]
                if dead:
                    self._fail(*self._dead_rank_message(dead))
                if deadline is not None and time.monotonic() > deadline:
                    self._fail(f"ranks did not report {waiting_for}")
                continue
            if kind == "error":
                self._fail(f"rank {rank} failed: {payload[0]}", payload[1])
            return kind, rank, payload

    def _collect(self, kind: str, timeout_s: float | None) -> dict:
        """Wait for one `kind` message per rank; fail fast on an error or a dead rank."""
        got: dict = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(got) < self.world_size:
            _, rank, payload = self._next_message(deadline, f"{kind!r} within {timeout_s:.0f} s" if timeout_s else repr(kind))
            got[rank] = payload
        return got

    def _dead_rank_message(self, dead) -> str:
        # A rank that stopped because of a peer exits with PEER_STOPPED_EXIT; the peer's own
        # error message may still be in flight, so give it a moment before blaming anyone.
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            try:
                msg_kind, rank, payload = self._results.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg_kind == "error":
                return f"rank {rank} failed: {payload[0]}", payload[1]
        roots = [(r, c) for r, c in dead if c != PEER_STOPPED_EXIT] or dead
        return "; ".join(f"rank {r} exited unexpectedly with code {c}" for r, c in roots), ""

    def _fail(self, message: str, details: str = ""):
        self.close(graceful=False)
        raise RankFailedError(message, details)

    def close(self, graceful: bool = True) -> None:
        """Stop the ranks: ask them to leave, then terminate whatever is still running."""
        if self.closed:
            return
        self.closed = True
        if graceful:
            for p, q in zip(self._procs, self._requests):
                if p.is_alive():
                    q.put(None)
            deadline = time.monotonic() + 10.0
            for p in self._procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()
