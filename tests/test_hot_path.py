"""The host-sync detector (engine.host_sync) itself: it must see a synchronising call made
by Tessera's code and ignore everybody else's. tests/test_wire_order.py runs it on spawned
ranks for patch-sync, patch, pcpp, CFG split, asg and tpp."""

from __future__ import annotations

import types

import torch

from engine.host_sync import HostSyncDetector


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
