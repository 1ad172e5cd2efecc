"""Streaming video with timestep-forcing pipeline parallelism (tpp): exactness against the
single-rank run, bounded caches, early stop, failures and bad input. Real worker processes
and gloo."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from engine import Engine, ParallelConfig
from engine.models.causal_video import ChunkKVCache
from engine.metrics import rel_l2
from engine.runtime.video import build_stream_request, describe_video
from engine.models.video import flow_sigmas, load_video_model
from launch.worker import RankFailedError
from parallel.config import ConfigError
from parallel.tpp import StagePlan

MODEL = "tiny-causal-video"
PROMPT = "a red ball bouncing"
CHUNKS = 6


def _tpp(world: int) -> Engine:
    return Engine.from_pretrained(MODEL, parallel=ParallelConfig(strategy="tpp", world_size=world))


@pytest.fixture(scope="module")
def serial():
    with Engine.from_pretrained(MODEL) as engine:
        yield engine


@pytest.fixture(scope="module")
def two_ranks():
    with _tpp(2) as engine:
        yield engine


def _frames(engine, **kw) -> tuple[np.ndarray, dict]:
    stream = engine.stream(PROMPT, float_frames=True, seed=3, **kw)
    frames = np.stack(list(stream))
    return frames, stream.report


def test_stage_plan_splits_steps_into_contiguous_runs():
    assert [list(StagePlan.build(4, 2).steps_of(r)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(StagePlan.build(4, 3).steps_of(r)) for r in range(3)] == [[0, 1], [2], [3]]
    plan = StagePlan.build(4, 5)  # one rank per step plus a decode-only rank
    assert [list(plan.steps_of(r)) for r in range(5)] == [[0], [1], [2], [3], []] and plan.decode_rank == 4
    with pytest.raises(ConfigError, match="use at most 5 ranks"):
        StagePlan.build(4, 6)


def test_schedule_runs_from_noise_to_clean():
    sigmas = flow_sigmas(4, 5.0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_kv_cache_keeps_the_sink_and_a_rolling_window():
    model = load_video_model(MODEL)
    cache = ChunkKVCache(model.num_layers, kv_window=2)
    text = model.encode_prompt(PROMPT, "cpu")
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    first = model.transformer.forward_chunk(x, t, text, cache, frame_offset=0)
    sink = cache.sink[0][0].clone()
    held = []
    for c in range(1, 6):
        model.transformer.forward_chunk(x, t, text, cache, frame_offset=2 * c)
        held.append(cache.chunks_held)
    assert held == [2, 3, 3, 3, 3] and torch.equal(cache.sink[0][0], sink)
    # the same chunk later in the stream attends to a cache: it is not the first chunk's output
    again = model.transformer.forward_chunk(x, t, text, cache, frame_offset=12, write=False)
    assert rel_l2(again.numpy(), first.numpy()) > 1e-3 and cache.chunks_held == 3


@pytest.mark.parametrize("world,steps", [(2, 2), (2, 4), (3, 3)])
def test_tpp_equals_the_single_rank_stream(serial, two_ranks, world, steps):
    reference, ref_report = _frames(serial, num_chunks=CHUNKS, steps=steps)
    if world == 2:
        frames, report = _frames(two_ranks, num_chunks=CHUNKS, steps=steps)
    else:
        with _tpp(world) as engine:
            frames, report = _frames(engine, num_chunks=CHUNKS, steps=steps)
    assert frames.shape == reference.shape == (CHUNKS * 2, 64, 64, 3)
    err = rel_l2(frames, reference)
    assert err <= 1e-5, f"tpp over {world} ranks (T={steps}) differs from one rank: rel L2 {err:.2e}"
    ranks = report["per_rank"]
    assert [r["steps"] for r in ranks] == [list(StagePlan.build(steps, world).steps_of(r)) for r in range(world)]
    latent_bytes = 1 * 4 * 2 * 16 * 16 * 4
    for r in ranks[:-1]:  # only the chunk latent crosses ranks (control words go through the store)
        assert r["bytes_sent"] == CHUNKS * latent_bytes
        assert r["chunks"] == CHUNKS
    assert ranks[-1]["bytes_sent"] == 0 and report["frames"] == CHUNKS * 2
    assert ref_report["per_rank"][0]["steps"] == list(range(steps))


def test_caches_stop_growing_after_the_window(two_ranks):
    _, report = _frames(two_ranks, num_chunks=20, steps=2, kv_window=3)
    for rank in report["per_rank"]:
        held, size = rank["cache_chunks_per_chunk"], rank["cache_bytes_per_chunk"]
        assert len(held) == 20
        assert held[:5] == [1, 2, 3, 4, 4] and set(held[4:]) == {4}  # sink + 3 rolling chunks
        assert len(set(size[4:])) == 1 and size[4] > size[0]


def test_stopping_an_endless_stream_stops_every_rank(two_ranks):
    stream = two_ranks.stream(PROMPT, num_chunks=None, steps=2)
    taken = [next(stream) for _ in range(5)]
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 30
    assert len(taken) == 5 and taken[0].dtype == np.uint8
    assert stream.report["chunks"] >= 3
    assert all(r["chunks"] >= 3 for r in stream.report["per_rank"])
    # the ranks are idle again: a new stream runs on the same engine
    frames, _ = _frames(two_ranks, num_chunks=2, steps=2)
    assert len(frames) == 4


def test_a_failing_rank_ends_the_stream_with_its_error(monkeypatch):
    monkeypatch.setenv("TESSERA_INJECT_FAULT", "rank=1,step=2")  # rank 1 raises at chunk 2
    engine = _tpp(3)
    monkeypatch.delenv("TESSERA_INJECT_FAULT")
    try:
        start = time.monotonic()
        with pytest.raises(RankFailedError, match="rank 1 failed: RuntimeError: injected fault at chunk 2"):
            list(engine.stream(PROMPT, num_chunks=10, steps=3))
        assert time.monotonic() - start < 60
    finally:
        engine.close()


def test_a_rank_killed_mid_stream_is_named():
    engine = _tpp(2)
    try:
        stream = iter(engine.stream(PROMPT, num_chunks=200, steps=2))
        next(stream)  # the pipeline is running
        os.kill(engine._backend._procs[1].pid, signal.SIGKILL)
        with pytest.raises(RankFailedError, match="rank 1 died \\(killed by SIGKILL\\)"):
            for _ in stream:
                pass
    finally:
        engine.close()


def test_bad_stream_input_fails_before_work(serial):
    info = describe_video(MODEL)
    with pytest.raises(ConfigError, match="at most 8"):
        build_stream_request(info, "tpp", 2, PROMPT, num_chunks=4, steps=9)
    with pytest.raises(ConfigError, match="num_chunks must be a positive integer"):
        serial.stream(PROMPT, num_chunks=0)
    with pytest.raises(ConfigError, match="multiple of 8"):
        serial.stream(PROMPT, num_chunks=2, height=60)
    with pytest.raises(ConfigError, match="use at most 3 ranks"):
        build_stream_request(info, "tpp", 4, PROMPT, num_chunks=4, steps=2)
    with pytest.raises(ConfigError, match="streaming video model"):
        serial.generate(PROMPT)
    with pytest.raises(ConfigError, match="use strategy 'tpp'"):
        Engine.from_pretrained(MODEL, parallel=ParallelConfig(strategy="patch", world_size=2))


def test_image_models_do_not_stream(pool):
    with pytest.raises(ConfigError, match="image model"):
        pool.serial_engine("tiny-sd").stream(PROMPT, num_chunks=2)


def test_a_saved_video_model_directory_streams_the_same(serial, tmp_path):
    from engine.models import save_preset

    path = save_preset(MODEL, str(tmp_path / "video"))
    assert os.path.isfile(os.path.join(path, "stream_config.json"))
    reference, _ = _frames(serial, num_chunks=3)
    with Engine.from_pretrained(path) as engine:
        frames, _ = _frames(engine, num_chunks=3)
    assert rel_l2(frames, reference) <= 1e-6


def test_stream_cli_writes_video_and_report(tmp_path, capsys):
    import json

    from launch.cli import main

    out, report = tmp_path / "video.gif", tmp_path / "stream.json"
    assert main(["stream", "--chunks", "3", "--nproc", "2", "--steps", "2", "--out", str(out), "--report",
                 str(report), "--compare-serial", "--no-progress"]) == 0
    data = json.loads(report.read_text())
    assert out.stat().st_size > 0 and data["frames"] == 6 and data["strategy"] == "tpp"
    assert data["vs_serial"]["psnr_db"] == "inf" and data["vs_serial"]["serial_steady_fps"] > 0
    assert main(["stream", "--chunks", "0"]) == 2  # bad input: before any rank starts
    assert "num_chunks must be a positive integer" in capsys.readouterr().err
