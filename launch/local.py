"""Local launcher: N worker processes on this machine, driven from the caller's process.

The parent hosts the rendezvous store (so it outlives any rank), spawns the ranks, and
watches them: a rank that raises or dies fails the pending request within seconds with
the rank and the cause, and the remaining ranks are terminated.
"""

from __future__ import annotations

import os
import queue
import signal
import time


from comms.groups import listening_store
from launch.processes import rank_context
from launch.worker import AGREE_S, LAUNCHER_PID_ENV, RankFailedError, RequestFailedError, worker_main

PEER_STOPPED_EXIT = 3  # comms.failure.EXIT_CODE: a rank that stopped because a peer failed
START_TIMEOUT_S = 600.0
DEATH_GRACE_S = 2.0  # how long a peer's error may take to arrive after its rank is seen gone
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL when the ranks are stopped


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"died (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"died (killed by signal {-code})"
    return f"exited unexpectedly with code {code}"


class LocalLauncher:
    def __init__(self, model, parallel, world_size: int, device=None, dtype=None, setup=None):
        self.world_size = world_size
        self._store = listening_store("127.0.0.1", parallel.comm_timeout_s)  # loopback only
        ctx = rank_context()
        self._results = ctx.Queue()
        self._requests = [ctx.Queue() for _ in range(world_size)]
        self._stop = ctx.Event()  # streams: the caller stopped consuming
        self._consumed = ctx.Value("i", 0)  # streams: chunks the caller has taken
        self._procs = [
            ctx.Process(
                target=worker_main,
                args=(rank, world_size, self._store.port, model, parallel, device, dtype, self._requests[rank], self._results,
                      (self._stop, self._consumed), setup, dict(os.environ, **{LAUNCHER_PID_ENV: str(os.getpid())})),
                name=f"tessera-rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.closed = False
        self.last_reports: list = []  # every rank's report of the last stream
        self._on_preview = None  # the caller's preview callback during a request
        self._preview_error = None  # what that callback raised, raised after the request
        try:
            self.info = self._collect("ready", START_TIMEOUT_S)[0]
        except RankFailedError as exc:
            self.close(graceful=False)
            if "exited" in str(exc) and not exc.details:  # died before it could say why
                raise RankFailedError(f"{exc} while starting (its error is printed above; a script that makes an "
                                      "engine must do so under `if __name__ == \"__main__\":`)", "") from None
            raise
        except BaseException:  # a failed start or Ctrl-C: leave no rank behind
            self.close(graceful=False)
            raise

    def _check_running(self) -> None:
        if self.closed:
            raise RankFailedError("this engine's ranks are stopped; call engine.restart() or make a new engine")

    def run(self, request, on_preview=None):
        self._check_running()
        self._on_preview, self._preview_error = on_preview, None
        for q in self._requests:
            q.put(request)
        try:
            output = self._collect("ok", None)[0]
            if self._preview_error is not None:  # raised once every rank finished: the queue stays in step
                raise self._preview_error
            return output
        except KeyboardInterrupt:  # Ctrl-C: stop the ranks now, not after the request
            self.close(graceful=False)
            raise

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
                if self._dead_ranks():
                    self._fail(*self._root_cause({}))
                if deadline is not None and time.monotonic() > deadline:
                    self._fail(f"ranks did not report {waiting_for}")
                continue
            if kind in ("error", "request_error"):
                self._on_error(rank, kind, payload)
            if kind == "preview":
                self._deliver_preview(payload)
                continue
            return kind, rank, payload

    def _deliver_preview(self, payload) -> None:
        """Hand a preview to the caller's callback. A callback that raises gets no more
        previews; its error is raised after the request (the ranks' results still arrive)."""
        if self._on_preview is None:
            return
        try:
            self._on_preview(*payload)
        except Exception as exc:  # the caller's code
            self._preview_error, self._on_preview = exc, None

    def _collect(self, kind: str, timeout_s: float | None) -> dict:
        """Wait for one `kind` message per rank; fail fast on an error or a dead rank."""
        got: dict = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(got) < self.world_size:
            _, rank, payload = self._next_message(deadline, f"{kind!r} within {timeout_s:.0f} s" if timeout_s else repr(kind))
            got[rank] = payload
        return got

    def _dead_ranks(self) -> dict:
        return {r: p.exitcode for r, p in enumerate(self._procs) if p.exitcode is not None}

    def _on_error(self, rank: int, kind: str, payload) -> None:
        """A rank reported an error. If every rank reports the same request error (the
        request fails at the same point everywhere), the request failed alone: raise it
        and keep the ranks. Anything else (a rank that died, one still inside a collective,
        different errors) takes the group down, naming the rank that caused it."""
        errors = {rank: (kind, payload)}
        end = time.monotonic() + AGREE_S
        while len(errors) < self.world_size and time.monotonic() < end and not self._unexplained_deaths(errors):
            if self._take_error(errors, 0.05) == "ok":
                break  # another rank finished the request: the ranks disagree
        points = {msg[2] if k == "request_error" else None for k, msg in errors.values()}
        if len(errors) == self.world_size and len(points) == 1 and None not in points:
            raise RequestFailedError(f"the request failed on every rank: {payload[0]}", errors[min(errors)][1][1])
        self._fail(*self._root_cause(errors))

    def _take_error(self, errors: dict, timeout_s: float) -> str | None:
        """The kind of the next message within `timeout_s` (None: none came); an error is
        recorded in `errors` under its rank."""
        try:
            kind, rank, payload = self._results.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if kind in ("error", "request_error"):
            errors[rank] = (kind, payload)
        return kind

    def _unexplained_deaths(self, errors: dict) -> dict:
        """Dead ranks that sent no error and did not stop because of a peer: the cause."""
        return {r: c for r, c in self._dead_ranks().items() if r not in errors and c != PEER_STOPPED_EXIT}

    def _root_cause(self, errors: dict) -> tuple[str, str]:
        """(message, details) naming the rank that caused a failure: a rank that died
        (killed by a signal or exited) before any error message, which its peers' errors
        (a closed connection) only echo; else the first rank that reported an error. With
        only ranks that stopped for a peer, the peer's message may still be in flight."""
        end = time.monotonic() + DEATH_GRACE_S
        while not errors and not self._unexplained_deaths(errors) and time.monotonic() < end:
            self._take_error(errors, 0.1)
        died = self._unexplained_deaths(errors)
        if died:
            return "; ".join(f"rank {r} {_exit_description(c)}" for r, c in sorted(died.items())), ""
        if errors:
            first = next(iter(errors))
            return f"rank {first} failed: {errors[first][1][0]}", errors[first][1][1]
        return "; ".join(f"rank {r} {_exit_description(c)}" for r, c in sorted(self._dead_ranks().items())), ""

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
        deadline = time.monotonic() + KILL_GRACE_S
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
