"""The steady-state hot path on real spawned ranks (gloo): no host-device synchronisation
from Tessera's own code in any step after the first stale one, for patch, pcpp, CFG split,
asg and tpp (engine.host_sync records them; on CPU they are free, on CUDA each stalls)."""

from __future__ import annotations

import types

import pytest
import torch

from engine import Engine, ParallelConfig
from engine.host_sync import ENV as DETECT_ENV
from engine.host_sync import HostSyncDetector

PROMPT = "a red circle"


def test_the_detector_sees_a_sync_in_tessera_code_and_ignores_others():
    from comms.exchange import StaleExchange

    detector = HostSyncDetector()
    detector.install()
    try:
        detector.armed = True
        torch.ones(1).item()  # the caller is this test: not Tessera's code
        fake = types.SimpleNamespace(_wire_max=lambda t: None)
        StaleExchange._agree(fake, [1, 2], torch.device("cpu"))  # torch.tensor(device=...) and .tolist()
        detector.armed = False
        torch.ones(1).item()
    finally:
        detector.uninstall()
    assert [c.split(" at ")[0] for c in detector.calls] == ["torch.tensor", "Tensor.tolist"]
    assert all("comms/exchange.py" in c for c in detector.calls)


@pytest.fixture(scope="module")
def watched(monkeypatch_module):
    monkeypatch_module.setenv(DETECT_ENV, "1")  # read by the spawned ranks
    with Engine.from_pretrained("tiny-sdxl", parallel=ParallelConfig(strategy="patch", world_size=2)) as engine:
        yield engine


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("name, config, size", [
    ("patch", dict(strategy="patch", warmup_steps=1, cfg_split=False), 128),
    ("pcpp", dict(strategy="pcpp", warmup_steps=1, cfg_split=False), 128),
    ("cfg split", dict(strategy="patch", warmup_steps=1, cfg_split=True), 128),
    ("asg", dict(strategy="asg", asg_staleness=1), 384),
])
def test_no_host_sync_in_steady_steps(watched, name, config, size):
    r = watched.generate(PROMPT, height=size, width=size, num_inference_steps=4, seed=0, progress=False,
                         parallel=ParallelConfig(**config))
    for part in r.report["per_rank"]:
        assert "host_syncs" in part, "the detector was not installed on the ranks"
        assert part["host_syncs"] == [], f"{name}, rank {part['rank']}: {part['host_syncs'][:10]}"


def test_no_host_sync_while_streaming(monkeypatch):
    monkeypatch.setenv(DETECT_ENV, "1")
    with Engine.from_pretrained("tiny-causal-video", parallel=ParallelConfig(strategy="tpp", world_size=2)) as engine:
        stream = engine.stream("a red ball", num_chunks=3, steps=2, float_frames=True)
        chunks = list(stream)
        assert len(chunks) == 3 * 2  # frames: two per chunk
        reports = stream.report["per_rank"]
    assert len(reports) == 2
    for report in reports:
        assert "host_syncs" in report, "the detector was not installed on the ranks"
        assert report["host_syncs"] == [], f"rank {report['rank']}: {report['host_syncs'][:10]}"
