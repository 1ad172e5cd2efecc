"""The Ray launcher: rank actors in a placement group, on a private one-node cluster and on
a two-node cluster started with `ray start` on this machine (loopback only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from engine import Engine, ParallelConfig  # noqa: E402
from engine.metrics import rel_l2  # noqa: E402
from launch.worker import RankFailedError  # noqa: E402

MODEL = "tiny-sd"
REQUEST = dict(height=128, width=128, num_inference_steps=4, guidance_scale=5.0, progress=False)
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def local_results(pool):
    """The local launcher's images for the same requests: the reference for Ray."""
    engine = pool.parallel_engine(MODEL, 2)
    return {
        strategy: engine.generate(PROMPT, seed=5, parallel=ParallelConfig(strategy=strategy, cfg_split=False,
                                                                          warmup_steps=1), **REQUEST)
        for strategy in ("patch-sync", "patch")
    }


@pytest.fixture(scope="module")
def ray_engine(ray_env):
    engine = Engine.from_pretrained(MODEL, parallel=ParallelConfig(strategy="patch", world_size=2),
                                    launcher="ray")
    yield engine
    engine.close()


def test_ray_matches_the_local_launcher(local_results, ray_engine):
    assert ray_engine.launch == "ray"
    for strategy, local in local_results.items():
        result = ray_engine.generate(PROMPT, seed=5, parallel=ParallelConfig(strategy=strategy, cfg_split=False,
                                                                              warmup_steps=1), **REQUEST)
        assert result.report["launch"] == "ray" and result.report["strategy"] == strategy
        assert len(result.report["per_rank"]) == 2
        assert all(r["bytes_sent"] > 0 for r in result.report["per_rank"])  # really two ranks talking
        err = rel_l2(result.latents.numpy(), local.latents.numpy())
        assert err <= 1e-6, f"{strategy}: Ray differs from the local launcher, rel L2 {err:.2e}"


def test_a_request_that_fails_on_every_rank_fails_alone_on_ray(ray_engine):
    from launch.worker import RequestFailedError

    pids = ray_engine._backend.actor_pids()
    # more steps than the scheduler was trained with: set_timesteps raises on every rank alike
    with pytest.raises(RequestFailedError, match="failed on every rank: ValueError"):
        ray_engine.generate(PROMPT, seed=1, **dict(REQUEST, num_inference_steps=1001))
    assert ray_engine._backend.actor_pids() == pids  # the same actors
    assert len(ray_engine.generate(PROMPT, seed=1, **REQUEST).images) == 1


def test_previews_reach_the_driver_from_rank_0(ray_engine):
    seen = []
    result = ray_engine.generate(PROMPT, seed=1, callback=lambda step, latents: seen.append((step, latents)),
                                 callback_steps=2, **REQUEST)
    assert [step for step, _ in seen] == [1, 3]
    np.testing.assert_array_equal(seen[-1][1], result.latents.numpy())


def test_concurrent_driver_threads_each_get_their_own_image(pool, ray_engine):
    serial = pool.serial_engine(MODEL)
    seeds = (11, 12)
    refs = {s: serial.generate([PROMPT, "a blue square"], seed=s, **REQUEST) for s in seeds}
    got, errors = {}, []

    def ask(seed):
        try:
            got[seed] = ray_engine.generate([PROMPT, "a blue square"], seed=seed,
                                            parallel=ParallelConfig(strategy="patch-sync", cfg_split=True), **REQUEST)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for s in seeds:
        assert len(got[s].images) == 2  # the batch of two prompts
        err = rel_l2(got[s].latents.numpy(), refs[s].latents.numpy())
        assert err <= 1e-5, f"seed {s}: rel L2 {err:.2e} vs serial"
    assert rel_l2(got[11].latents.numpy(), got[12].latents.numpy()) > 0.1


def test_killed_actor_fails_the_request_and_restart_recovers(ray_engine):
    pids = ray_engine._backend.actor_pids()
    failure = {}

    def long_request():
        start = time.monotonic()
        try:
            ray_engine.generate(PROMPT, seed=1, **dict(REQUEST, num_inference_steps=200, height=256, width=256))
        except RankFailedError as exc:
            failure["error"], failure["after_kill_s"] = exc, time.monotonic() - killed_at[0]
        failure.setdefault("elapsed", time.monotonic() - start)

    killed_at = [None]
    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(5.0)  # mid-run
    killed_at[0] = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the pending request did not fail"
    assert "error" in failure, "the request finished although rank 1 was killed"
    assert "rank 1" in str(failure["error"]), failure["error"]
    assert failure["after_kill_s"] < 30.0
    with pytest.raises(RankFailedError, match="restart"):
        ray_engine.generate(PROMPT, seed=1, **REQUEST)
    ray_engine.restart()
    result = ray_engine.generate(PROMPT, seed=1, **REQUEST)
    assert len(result.images) == 1 and len(result.report["per_rank"]) == 2


def _ray_cli(*args, env):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.cluster
def test_two_node_cluster_on_loopback(ray_env, ray_engine, pool):
    ray_engine.close()  # its private cluster goes; this test's driver joins a started one
    port = 6391
    # Ray treats =0 as "single-node only" (its Windows/OSX mode): lift it for a real second
    # node; --node-ip-address keeps every daemon on loopback.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    head = _ray_cli("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    "--include-dashboard=false", "--disable-usage-stats", env=env)
    try:
        assert head.returncode == 0, head.stderr
        worker = _ray_cli("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                          "--disable-usage-stats", env=env)
        assert worker.returncode == 0, worker.stderr
        with Engine.from_pretrained(MODEL, parallel=ParallelConfig(strategy="patch-sync", world_size=2),
                                    launcher="ray", address=f"127.0.0.1:{port}") as engine:
            nodes = [node for node, _ in engine._backend.nodes]
            assert len(set(nodes)) == 2, f"both ranks landed on one node: {nodes}"
            result = engine.generate(PROMPT, seed=5, **REQUEST)
        ref = pool.serial_engine(MODEL).generate(PROMPT, seed=5, **REQUEST)
        assert rel_l2(result.latents.numpy(), ref.latents.numpy()) <= 1e-5
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _ray_cli("stop", "--force", env=env)

