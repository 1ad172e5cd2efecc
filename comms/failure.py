"""Fail fast: when one rank raises, every other rank stops within seconds, with the cause.

Peers of a failed rank would otherwise sit inside a collective until its timeout. The
failing rank writes its cause under a well-known key of the rendezvous store (hosted by
the torchrun agent or by Tessera's local launcher, so it outlives any one rank); a daemon
thread on every rank watches that key and ends the process when it appears. The main
thread never polls, so there is no cost on the hot path.

The watch thread checks the key every POLL_S seconds with `check` rather than blocking in
a timed `wait` (each timed-out wait logs a C++ warning), and can therefore be stopped
cleanly before the process exits: a thread still blocked inside the store client at
interpreter exit aborts the process.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from comms.groups import client_store

FAILED_KEY = "tessera/failed"
EXIT_CODE = 3
POLL_S = 0.2


class FailureWatch:
    def __init__(self, rank: int, addr: str, port: int, exit_on_store_loss: bool = False,
                 launcher_pid: int | None = None):
        """`exit_on_store_loss`: for ranks whose store lives in a launcher process; if that
        process dies, nothing else would ever stop them. `launcher_pid`: that process, on this
        machine: its death is noticed before the store's client does (which logs a C++ stack
        trace on a closed connection)."""
        self.rank = rank
        self.launcher_pid = launcher_pid
        self.addr = addr
        self.port = port
        self.exit_on_store_loss = exit_on_store_loss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tessera-failure-watch", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        try:
            store = client_store(self.addr, self.port, timeout_s=30)
            while not store.check([FAILED_KEY]):
                if self._stop.wait(POLL_S):
                    return
                if self.launcher_pid is not None and not _alive(self.launcher_pid):
                    raise ConnectionError("the launcher process is gone")
            cause = store.get(FAILED_KEY).decode()
        except Exception:
            if self.exit_on_store_loss and not self._stop.is_set():
                print(f"[tessera rank {self.rank}] stopping: the launcher's store is gone", file=sys.stderr, flush=True)
                os._exit(EXIT_CODE)
            return  # the store went away: the launcher handles ranks that vanish
        if cause.startswith(f"rank {self.rank}:"):
            return  # our own report; the main thread is already raising it
        print(f"[tessera rank {self.rank}] stopping: {cause}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def report(self, exc: BaseException) -> None:
        """Publish this rank's failure so every peer stops (best effort, never raises)."""
        message = f"rank {self.rank}: {type(exc).__name__}: {exc}".splitlines()[0][:2000]
        try:
            client_store(self.addr, self.port, timeout_s=5).set(FAILED_KEY, message)
        except Exception:
            pass


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie does not)."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def store_address() -> tuple[str, int] | None:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return addr, int(port)
