"""Run a function on N real gloo ranks (spawned processes) and collect what each returns.

The ranks of each world size are spawned once and kept (a process group each), so the
many small comms tests pay the spawn and the imports once: each call sends the function to
every rank and waits for all of them. A call that fails on any rank, or times out, tears
its ranks down (a peer may be stuck in a collective); the next call spawns fresh ones.
"""

from __future__ import annotations

import atexit
import os
import datetime
import queue
import traceback


from comms.groups import free_port
from launch.processes import adopt_environment, rank_context


def _serve(rank, world, port, requests, results, env):
    import torch.distributed as dist

    adopt_environment(env)

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        job = requests.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class _Ranks:
    def __init__(self, world: int):
        ctx = rank_context()
        self.world = world
        self.results = ctx.Queue()
        self.requests = [ctx.Queue() for _ in range(world)]
        port = free_port()
        env = dict(os.environ)
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.requests[r], self.results, env), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float) -> list:
        for q in self.requests:
            q.put((fn, args))
        out = {}
        for _ in range(self.world):
            try:
                rank, status, value = self.results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"ranks did not answer within {timeout} s") from None
            if status == "error":
                raise AssertionError(f"rank {rank} raised:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.world)]

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for q in self.requests:
                q.put(None)
        for p in self.procs:
            p.join(timeout=10 if graceful else 0.1)
            if p.is_alive():
                p.kill()


_LIVE: dict[int, _Ranks] = {}


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    ranks = _LIVE.get(world)
    if ranks is None:
        ranks = _LIVE[world] = _Ranks(world)
    try:
        return ranks.run(fn, args, timeout)
    except BaseException:
        del _LIVE[world]
        ranks.close(graceful=False)
        raise


@atexit.register
def _close_all() -> None:
    for ranks in _LIVE.values():
        ranks.close()
    _LIVE.clear()
