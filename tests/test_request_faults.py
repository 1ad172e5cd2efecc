"""A request that fails on every rank fails alone; a rank that raises or dies takes the group
down fast, named as the cause; `restart()` and `auto_restart` bring the group back.

One engine (tiny-sd, 2 local ranks) goes through every case in order: two spawns in all.
"""

import os
import signal
import threading
import time

import pytest

from engine import Engine, ParallelConfig
from engine.faults import FAULT_ENV
from launch.worker import RankFailedError, RequestFailedError

EVERYWHERE, ON_RANK_1 = "fail everywhere", "fail on rank 1"
KW = dict(height=64, width=64, num_inference_steps=3, guidance_scale=1.0, progress=False)


@pytest.fixture(scope="module")
def engine():
    os.environ[FAULT_ENV] = f"rank=all,step=1,prompt={EVERYWHERE};rank=1,step=2,prompt={ON_RANK_1}"
    try:  # the spawned ranks (and every respawn) read the hook from the environment
        engine = Engine.from_pretrained("tiny-sd", parallel=ParallelConfig(strategy="patch", world_size=2))
        yield engine
    finally:
        os.environ.pop(FAULT_ENV, None)
    engine.close()


def _alive(engine) -> bool:
    return all(p.is_alive() for p in engine._backend._procs)


def test_a_request_that_fails_on_every_rank_fails_alone(engine):
    procs = list(engine._backend._procs)
    with pytest.raises(RequestFailedError, match="failed on every rank: RuntimeError: injected fault at step 1"):
        engine.generate(EVERYWHERE, **KW)
    assert _alive(engine) and engine._backend._procs == procs
    # more steps than the scheduler was trained with: its set_timesteps raises on every rank
    with pytest.raises(RequestFailedError, match="failed on every rank: ValueError"):
        engine.generate("x", **dict(KW, num_inference_steps=1001))
    assert _alive(engine)
    assert engine.generate("a red circle", **KW).image.size == (64, 64)
    assert engine._backend._procs == procs  # the same ranks served it


def test_a_rank_that_dies_is_named_and_auto_restart_brings_the_group_back(engine):
    engine.auto_restart = True
    victim = engine._backend._procs[1]
    errors = []

    def run():
        try:
            engine.generate("long", **dict(KW, height=128, width=128, num_inference_steps=500))
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append((time.monotonic(), exc))

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)  # mid-request: rank 0 then sees its peer's connection close
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert errors, f"the request did not fail (still running: {thread.is_alive()})"
    at, exc = errors[0]
    assert isinstance(exc, RankFailedError) and "rank 1 died (killed by SIGKILL)" in str(exc), repr(exc)
    assert at - killed < 10
    assert engine.generate("x", **KW).image.size == (64, 64)  # brought back by itself
    assert _alive(engine)


def test_a_rank_that_raises_stops_every_rank_within_seconds(engine):
    procs = engine._backend._procs
    start = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank 1 failed: RuntimeError: injected fault at step 2"):
        engine.generate(ON_RANK_1, **dict(KW, num_inference_steps=6))
    assert time.monotonic() - start < 30
    assert all(not p.is_alive() for p in procs)
    engine.auto_restart = False
    with pytest.raises(RankFailedError, match="restart"):
        engine.generate("x", **KW)
