"""GPU placement and waits that no communicator timeout may bound: a peer still loading its
model and rank 0 busy before a request (comparing against serial under torchrun). Real
spawned ranks with comm_timeout_s=5. A stream's consumer holding the pipeline back is
tested with the tpp wire-order check (tests/test_wire_order.py)."""

from __future__ import annotations

import time

import pytest
import torch

from comms import groups
from engine import Engine, ParallelConfig
from engine.faults import DELAY_ENV

TIMEOUT_S, SLOW_S = 5, 6.5


def test_a_local_rank_without_its_own_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert groups.local_device(1) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="local rank 2 has no GPU of its own: 2 visible"):
        groups.local_device(2)
    with pytest.raises(RuntimeError, match="no GPU of its own"):
        groups.local_device(3, "cuda")


def test_a_ray_actor_takes_the_gpu_ray_assigned(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert groups.ray_local_gpu(local_rank=0) == 1  # its index among the visible GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert groups.ray_local_gpu(local_rank=0) == 3  # Ray left the GPUs visible: the physical id
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert groups.ray_local_gpu(local_rank=1) == 1  # no GPU (CPU actors)


def test_slow_loading_and_a_busy_rank_0_never_trip_the_timeout(monkeypatch):
    monkeypatch.setenv(DELAY_ENV, f"rank=1,load={SLOW_S};rank=0,request={SLOW_S}")
    config = ParallelConfig(strategy="patch", world_size=2, comm_timeout_s=TIMEOUT_S)
    with Engine.from_pretrained("tiny-sd", parallel=config) as engine:
        start = time.monotonic()
        r = engine.generate("a red circle", height=64, width=64, num_inference_steps=2, progress=False)
        assert time.monotonic() - start >= SLOW_S  # rank 1 really waited for rank 0
        assert r.report["world_size"] == 2
