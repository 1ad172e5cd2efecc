"""NCCL's semantics, checked on gloo (comms.wire_check): every communicator's members issue
the same operations in the same order and every pair's point-to-point messages match in
order; results stay the same with every tag forced to 0 (gloo then matches in posting
order, as NCCL does) and with completions deferred to wait() (no result read early, no
send buffer modified in flight). The same ranks also run the host-sync detector
(engine.host_sync): no Tessera code synchronises host and device in a steady step. Real
spawned ranks, 3 and 4 of them, for patch-sync, patch, pcpp, CFG split, asg and tpp."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from comms.wire_check import DEFERRED_ENV, RECORD_ENV, TAG0_ENV, check_order
from engine import Engine, ParallelConfig
from engine.metrics import rel_l2
from engine.host_sync import ENV as HOST_SYNC_ENV

PROMPT = "a red circle"
SHORT_TIMEOUT_S = 5
SIZE, STEPS = 128, 4
HOOKS = (RECORD_ENV, TAG0_ENV, DEFERRED_ENV, HOST_SYNC_ENV)


@contextlib.contextmanager
def _checked_engine(model, world, strategy, **config):
    with pytest.MonkeyPatch.context() as mp:
        for env in HOOKS:
            mp.setenv(env, "1")  # read by the ranks when they start
        parallel = ParallelConfig(strategy=strategy, world_size=world, **config)
        with Engine.from_pretrained(model, parallel=parallel) as engine:
            yield engine


def _records(parts) -> dict:
    """Every rank's operations; checks on the way that no rank synchronised host and device."""
    assert all("wire" in p for p in parts), "the recorder was not installed on the ranks"
    for p in parts:
        assert "host_syncs" in p, "the host-sync detector was not installed on the ranks"
        assert p["host_syncs"] == [], f"rank {p['rank']} synchronised in a steady step: {p['host_syncs'][:10]}"
    return {p["rank"]: p["wire"] for p in parts}


def test_check_order_finds_a_reordering():
    coll = [["0", [0, 1]], ["all_gather", "float32", 8]]
    send = [["0", [0, 1]], ["batch", [["p2p", 0, 1, "float32", 4]]]]
    recv = [["0", [0, 1]], ["batch", [["p2p", 0, 1, "float32", 4]]]]
    assert check_order({0: [coll, send], 1: [coll, recv]}) == []
    assert check_order({0: [send, coll], 1: [coll, recv]})  # NCCL: rank 0 sends while rank 1 gathers
    assert check_order({0: [coll], 1: [coll, coll]})


REQUESTS = {
    3: [("patch-sync", dict(strategy="patch-sync", cfg_split=False)),
        ("patch", dict(strategy="patch", warmup_steps=1, cfg_split=False)),
        ("pcpp", dict(strategy="pcpp", warmup_steps=1, cfg_split=False)),
        ("asg", dict(strategy="asg", asg_staleness=1)),
        # previews assemble the latent on every rank mid-run and guidance_rescale all-reduces
        # every step, beside the branch's broadcasts (a ControlNet pipeline takes no guidance_rescale)
        ("asg previews + guidance_rescale", dict(strategy="asg", asg_staleness=1),
         dict(callback=lambda step, preview: None, callback_steps=2, guidance_rescale=0.5))],
    4: [("patch cfg split", dict(strategy="patch", warmup_steps=1, cfg_split=True))],
}


@pytest.mark.parametrize("world", [3, 4])
def test_image_strategies_keep_nccl_order_and_results_with_tag_0_and_deferred_completion(pool, world):
    reference = pool.parallel_engine("tiny-sdxl", world)  # no hooks
    with _checked_engine("tiny-sdxl", world, "patch") as checked:
        for name, config, *extra in REQUESTS[world]:
            size = 384 if config["strategy"] == "asg" else SIZE
            kw = dict(height=size, width=size, num_inference_steps=STEPS, seed=3, progress=False,
                      parallel=ParallelConfig(**config), **(extra[0] if extra else {}))
            got = checked.generate(PROMPT, **kw)
            assert check_order(_records(got.report["per_rank"])) == [], name
            want = reference.generate(PROMPT, **kw)
            err = rel_l2(got.latents.numpy(), want.latents.numpy())
            assert err == 0.0, f"{name}: the hooks changed the result (rel L2 {err:.2e})"


def test_tpp_keeps_nccl_order_and_frames_with_tag_0_and_deferred_completion_and_a_slow_consumer():
    """Also: a consumer slower than the communicator timeout holds the pipeline back (the
    upstream ranks wait in the store) and nothing times out."""
    frames = {}
    with Engine.from_pretrained("tiny-causal-video") as serial:
        frames["serial"] = np.stack(list(serial.stream("a red ball", num_chunks=3, steps=3, float_frames=True)))
    with _checked_engine("tiny-causal-video", 3, "tpp", comm_timeout_s=SHORT_TIMEOUT_S) as checked:
        stream = checked.stream("a red ball", num_chunks=3, steps=3, float_frames=True)
        got = []
        for frame in stream:
            got.append(frame)
            if len(got) == 1:
                time.sleep(SHORT_TIMEOUT_S + 1.5)  # slower than any collective may take
        frames["tpp"] = np.stack(got)
        assert check_order(_records(stream.report["per_rank"])) == []
    assert rel_l2(frames["tpp"], frames["serial"]) <= 1e-5


def test_deferred_completion_withholds_results_and_catches_modified_sends():
    import torch

    from comms.wire_check import _Deferred

    class Done:
        def wait(self):
            return True

    recv, send = torch.arange(4.0), torch.ones(2)
    work = _Deferred([Done()], [recv], [send])
    assert torch.isnan(recv).all()  # not readable before wait()
    work.wait()
    assert recv.tolist() == [0.0, 1.0, 2.0, 3.0]
    flat = torch.zeros(8, dtype=torch.uint8)  # byte buckets: poisoned to NaN in any float view
    _Deferred([Done()], [flat], [])
    assert torch.isnan(flat[:4].view(torch.float32)).all()
    work = _Deferred([Done()], [], [send])
    send.add_(1)  # modified while in flight
    with pytest.raises(RuntimeError, match="modified while its operation was in flight"):
        work.wait()
