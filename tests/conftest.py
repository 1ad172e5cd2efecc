"""Shared fixtures: serial reference engines and one live group of spawned ranks at a time.

Spawning ranks costs seconds (every rank imports torch and diffusers), so a group is kept
alive across the tests that need the same (model, world size) and closed when a test
asks for another one.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class EnginePool:
    def __init__(self):
        self.serial = {}
        self.live_key = None
        self.live = None

    def serial_engine(self, model):
        from engine import Engine

        if model not in self.serial:
            self.serial[model] = Engine.from_pretrained(model)
        return self.serial[model]

    def parallel_engine(self, model, world):
        from engine import Engine, ParallelConfig

        key = (model, world)
        if self.live_key != key or self.live._backend.closed:
            self.close_live()
            self.live = Engine.from_pretrained(model, parallel=ParallelConfig(strategy="patch", world_size=world))
            self.live_key = key
        return self.live

    def close_live(self):
        if self.live is not None:
            self.live.close()
        self.live, self.live_key = None, None


@pytest.fixture(scope="session")
def pool():
    p = EnginePool()
    yield p
    p.close_live()
