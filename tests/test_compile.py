"""torch.compile of the parallel denoiser (ParallelConfig.compile, parallel/patch/compiled.py).

Compiled, `patch-sync` still equals serial and `patch` equals eager `patch`; dynamo breaks
the graph only at the exchange's opaque calls (a bucket's launch, a wait, a blocking
exchange), never inside the layers' own computation.

The backend is "aot_eager" here: dynamo's tracing and AOTAutograd's functionalization (of
the in-place writes into bucket views, the part that is ours) without inductor's C++
builds, which take minutes cold on 2 cores. `make test-compile` runs this file with
inductor (TESSERA_COMPILE_BACKEND=inductor); the isolated benchmark measures inductor.
"""
import os

import pytest
import torch

from benchmarks.isolated import IsolatedRanks, compile_breaks, load_subject
from engine import ParallelConfig
from engine.metrics import rel_l2
from parallel.patch.compiled import BACKEND_ENV
from parallel.config import ConfigError

MODEL, SIZE = "tiny-sd", 128


@pytest.fixture(autouse=True, scope="module")
def backend():
    """aot_eager unless the caller chose a backend (spawned ranks inherit the variable)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(BACKEND_ENV, os.environ.get(BACKEND_ENV) or "aot_eager")
    yield os.environ[BACKEND_ENV]
    mp.undo()


def _steps(isolated, subject, config, steps):
    args, kwargs = subject.call
    with torch.no_grad(), isolated.request(config):
        return [subject.denoiser(*args, **kwargs)[0].clone() for _ in range(steps)]


def test_compiled_patch_equals_eager_patch_and_breaks_only_at_comms():
    from torch._dynamo.utils import counters

    subject = load_subject(MODEL, SIZE, torch.device("cpu"), torch.float32)
    isolated = IsolatedRanks(subject)  # rank 1 of 3: a middle band, both neighbours
    isolated.place(3, 1)
    eager = _steps(isolated, subject, ParallelConfig(strategy="patch", warmup_steps=1, cfg_split=False), 5)
    counters.clear()
    compiled = _steps(isolated, subject, ParallelConfig(strategy="patch", warmup_steps=1, cfg_split=False,
                                                        compile=True), 5)
    breaks = compile_breaks()
    assert breaks["graphs"] > 0, "nothing was compiled"
    for step, (a, b) in enumerate(zip(eager, compiled)):
        err = rel_l2(b.numpy(), a.numpy())
        assert err < 1e-5, f"step {step}: compiled patch differs from eager patch by {err:.2e}"
    assert breaks["graph_breaks"] > 0  # launches and waits are opaque calls
    assert breaks["graph_breaks_outside_comms"] == 0, counters["graph_break"]


def test_compiled_patch_sync_equals_serial(pool):
    kw = dict(height=128, width=128, num_inference_steps=3, seed=7, progress=False)
    ref = pool.serial_engine(MODEL).generate("a red circle", **kw)
    result = pool.parallel_engine(MODEL, 2).generate(
        "a red circle", parallel=ParallelConfig(strategy="patch-sync", cfg_split=False, compile=True), **kw)
    assert result.report["compile"] is True
    err = rel_l2(result.latents.numpy(), ref.latents.numpy())
    assert err <= 1e-5, f"compiled patch-sync differs from serial: rel L2 {err:.2e}"


@pytest.mark.parametrize("bad", [dict(compile="yes"), dict(compile=1), dict(strategy="asg", compile=True),
                                 dict(strategy="tpp", compile=True)])
def test_compile_refused_where_it_does_not_apply(bad):
    with pytest.raises(ConfigError, match="compile"):
        ParallelConfig(**bad).validate()
