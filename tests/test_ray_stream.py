"""Streaming video (tpp) on the Ray launcher: frames from the decoding rank's actor through a
Ray queue, the caller's consumption and stop back to rank 0 through a control actor."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("ray")

from engine import Engine, ParallelConfig  # noqa: E402
from launch.worker import RankFailedError  # noqa: E402

MODEL = "tiny-causal-video"
PROMPT = "a red ball bouncing"
FAULT_CHUNK = 6  # rank 1 raises at chunk 6: the first streams end before it, the last reaches it


def test_ray_stream_matches_one_rank_stops_early_and_fails_fast(ray_env, monkeypatch):
    with Engine.from_pretrained(MODEL) as single, single.stream(PROMPT, num_chunks=3, steps=2, float_frames=True) as s:
        reference = np.stack(list(s))
    monkeypatch.setenv("TESSERA_INJECT_FAULT", f"rank=1,step={FAULT_CHUNK}")  # read when the actors start
    engine = Engine.from_pretrained(MODEL, parallel=ParallelConfig(strategy="tpp", world_size=2), launcher="ray")
    try:
        with engine.stream(PROMPT, num_chunks=3, steps=2, float_frames=True) as s:
            frames = np.stack(list(s))
        assert np.array_equal(frames, reference)  # each rank runs one step of every chunk
        assert [p["rank"] for p in s.report["per_rank"]] == [0, 1]

        # An endless stream closed after its first chunk: rank 0 is at most world + 2 chunks
        # ahead (backpressure), so it stops before the fault and every rank drains.
        endless = engine.stream(PROMPT, steps=2)
        next(endless)
        endless.close()
        with engine.stream(PROMPT, num_chunks=1, steps=2, float_frames=True) as s:
            assert np.array_equal(np.stack(list(s)), reference[:len(frames) // 3])

        start = time.monotonic()
        with pytest.raises(RankFailedError, match=f"rank 1 failed: RuntimeError: injected fault at chunk {FAULT_CHUNK}"):
            list(engine.stream(PROMPT, num_chunks=10, steps=2))
        assert time.monotonic() - start < 60
    finally:
        engine.close()
