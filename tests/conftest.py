"""Shared fixtures: serial reference engines and one live group of spawned ranks at a time.

Spawning ranks costs seconds (every rank imports torch and diffusers and builds the
model), so groups are kept alive across tests and modules that need the same (model,
world size).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import OrderedDict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class EnginePool:
    """Serial engines, and live groups of spawned ranks keyed by (model, world size).

    Idle ranks block on their request queue (no CPU), so several groups stay alive and
    later modules reuse them; the least recently used group is closed when more than
    MAX_LIVE_RANKS ranks would be alive (memory: ~0.4 GB per rank)."""

    MAX_LIVE_RANKS = 16

    def __init__(self):
        self.serial = {}
        self.live = OrderedDict()  # (model, world) -> Engine, least recently used first

    def serial_engine(self, model):
        from engine import Engine

        if model not in self.serial:
            self.serial[model] = Engine.from_pretrained(model)
        return self.serial[model]

    def parallel_engine(self, model, world):
        from engine import Engine, ParallelConfig

        key = (model, world)
        engine = self.live.get(key)
        if engine is not None and engine._backend.closed:
            del self.live[key]
            engine = None
        if engine is None:
            while self.live and sum(w for _, w in self.live) + world > self.MAX_LIVE_RANKS:
                self.live.popitem(last=False)[1].close()
            engine = Engine.from_pretrained(model, parallel=ParallelConfig(strategy="patch", world_size=world))
            self.live[key] = engine
        self.live.move_to_end(key)
        return engine

    def close_live(self):
        """Close every live group at once: each waits a second or two for its ranks to leave."""
        from concurrent.futures import ThreadPoolExecutor

        engines = list(self.live.values())
        self.live.clear()
        with ThreadPoolExecutor(max_workers=max(1, len(engines))) as pool:
            list(pool.map(lambda engine: engine.close(), engines))


@pytest.fixture(scope="session")
def pool():
    p = EnginePool()
    yield p
    p.close_live()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine two
    threads made a 2-step run ~100x slower (5 s vs 50 ms) while other jobs ran."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_env():
    """Ray on loopback, its files under a short private directory (unix socket paths are
    limited to ~107 characters), no auth token in the home directory."""
    tmp = tempfile.mkdtemp(prefix="tray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_TMPDIR",
                                           "RAY_ADDRESS")}
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp)
    os.environ.pop("RAY_ADDRESS", None)
    yield tmp
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(tmp, ignore_errors=True)
