"""The body of one rank: join the group, load the model, serve requests.

Used by the local launcher's worker processes; a torchrun process runs the same
`RankRuntime` in-process instead.
"""

from __future__ import annotations

import os
import traceback

LAUNCHER_PID_ENV = "TESSERA_LAUNCHER_PID"  # the local launcher's process, watched by its ranks
AGREE_S = 2.0  # how long the other ranks may take to fail the same way (then the request failed alone)


class RankFailedError(RuntimeError):
    """A rank raised or died; the message names the rank and the cause."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details  # the failing rank's traceback, when it sent one


class RequestFailedError(RuntimeError):
    """A request raised on every rank at the same point: it failed alone, and the ranks are
    still up for the next request."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details  # rank 0's traceback


def summarize(exc: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__


def configure_threads(threads: int | None, local_world: int) -> None:
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores // max(1, local_world)))


CHUNKS_AHEAD_SLACK = 2  # rank 0 may be world_size + 2 chunks ahead of the consumer: every rank busy


def serve_stream(runtime, request, rank, results, stop, consumed) -> None:
    """Run this rank's part of a stream: frames go to the parent as they are decoded."""
    import time

    ahead = request.world_size + CHUNKS_AHEAD_SLACK

    def may_start(chunk):  # backpressure: the parent counts the chunks its caller consumed
        while chunk - consumed.value >= ahead and not stop.is_set():
            time.sleep(0.002)

    for chunk, frames, at in runtime.stream(request, should_stop=stop.is_set, may_start=may_start):
        results.put(("frames", rank, (chunk, frames, at)))
    results.put(("ok", rank, runtime.last_report))


def _thread_lock_for_progress_bars() -> None:
    """tqdm's default lock is a multiprocessing semaphore registered with the parent's
    resource tracker; a rank that is terminated never releases it, and the parent then
    warns of leaked semaphores at exit. A rank's bars need only a thread lock."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def worker_main(rank, world_size, store_port, model, parallel, device, dtype, requests, results, control=None,
                setup=None, env=None):
    """Entry point of a started rank. Talks to the parent only through two queues (and, for
    streams, a stop event and a consumed-chunks counter in `control`). `env`: the caller's
    environment (launch.processes.adopt_environment)."""
    if env is not None:
        from launch.processes import adopt_environment

        adopt_environment(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    from comms.groups import pin_to_loopback

    pin_to_loopback(os.environ)  # one machine: gloo / NCCL never listen beyond loopback
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the ranks
    _thread_lock_for_progress_bars()
    watch = None
    try:
        configure_threads(parallel.threads_per_rank, world_size)
        from engine.quiet import quiet_libraries

        quiet_libraries(rank)  # before loading: the known library messages go, and rank 0 alone warns
        from comms.failure import FailureWatch
        from comms.groups import client_store, init_distributed
        from engine.runtime.image import make_runtime
        from engine.runtime.video import StreamRequest

        launcher = os.environ.get(LAUNCHER_PID_ENV)
        watch = FailureWatch(rank, "127.0.0.1", store_port, exit_on_store_loss=True,
                             launcher_pid=int(launcher) if launcher else None)
        store = client_store("127.0.0.1", store_port, parallel.comm_timeout_s)
        topo = init_distributed(rank, world_size, rank, device, parallel.comm_timeout_s, store=store)
        runtime = make_runtime(model, topo, dtype, setup)
        results.put(("ready", rank, runtime.info))
        if rank == 0:  # previews (generate(callback=...)) go to the parent with the results
            runtime.preview_sink = lambda step, preview: results.put(("preview", rank, (step, preview)))
        while True:
            request = requests.get()
            if request is None:
                break
            if isinstance(request, StreamRequest):
                serve_stream(runtime, request, rank, results, *control)
                continue
            try:
                output = runtime.run(request)
            except Exception as exc:  # whether the request failed alone (on every rank alike) is the parent's call
                point = (summarize(exc), runtime.topo.barriers)
                results.put(("request_error", rank, (point[0], traceback.format_exc(), point)))
                continue
            results.put(("ok", rank, output if rank == 0 else None))
    except BaseException as exc:  # report anything, then leave: the group is unusable now
        if watch is not None:
            watch.report(exc)
        results.put(("error", rank, (summarize(exc), traceback.format_exc())))
        results.close()
        results.join_thread()
        os._exit(1)
    results.close()
    results.join_thread()
    from comms.groups import shutdown

    shutdown()
