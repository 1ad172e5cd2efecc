"""Testing hook: find host-device synchronisations in steady-state steps.

With TESSERA_DETECT_HOST_SYNC=1 a rank patches the calls that make a GPU host wait for
the device (`Tensor.item/.cpu/.tolist/.numpy/__bool__/__float__/__int__`, `nonzero`,
`torch.tensor(..., device=...)`, stream, event and device synchronisation). While armed
(the steps after the first stale one: see `arm`), every such call whose nearest caller
outside torch is in Tessera's `comms/`, `parallel/` or `engine/` is recorded, and the
rank's report carries the list (`host_syncs`). Calls from diffusers itself are not ours to
change and are not recorded. On CPU these calls cost nothing, which is why a test must
look for them: on CUDA each one stalls the host until the GPU has caught up.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch

ENV = "TESSERA_DETECT_HOST_SYNC"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("comms", "parallel", "engine"))
_TORCH = os.path.dirname(torch.__file__) + os.sep
_SELF = os.path.abspath(__file__)

_TENSOR_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "nonzero")


class HostSyncDetector:
    def __init__(self):
        self.armed = False
        self.calls: list[str] = []
        self._inside = False

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith(_TORCH) and name != _SELF:
                return f"{name[len(_ROOT) + 1:]}:{frame.f_lineno}" if name.startswith(_OURS) else None
            frame = frame.f_back
        return None

    def _wrap(self, what: str, original):
        detector = self

        def wrapper(*args, **kwargs):
            if detector.armed and not detector._inside:
                if what != "torch.tensor" or kwargs.get("device") is not None:
                    detector._inside = True
                    try:
                        where = detector._caller()
                    finally:
                        detector._inside = False
                    if where is not None:
                        detector.calls.append(f"{what} at {where}")
            return original(*args, **kwargs)

        return wrapper

    def _targets(self):
        yield from ((torch.Tensor, name, f"Tensor.{name}") for name in _TENSOR_METHODS)
        yield torch, "tensor", "torch.tensor"
        yield torch.cuda, "synchronize", "cuda.synchronize"
        yield torch.cuda.Stream, "synchronize", "Stream.synchronize"
        yield torch.cuda.Event, "synchronize", "Event.synchronize"

    def install(self) -> None:
        self._originals = []
        for owner, name, what in self._targets():
            original = getattr(owner, name)
            self._originals.append((owner, name, original))
            setattr(owner, name, self._wrap(what, original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals = []


_DETECTOR: HostSyncDetector | None = None


def detector() -> HostSyncDetector | None:
    """The process's detector when TESSERA_DETECT_HOST_SYNC is set (installed once)."""
    global _DETECTOR
    if _DETECTOR is None and os.environ.get(ENV):
        _DETECTOR = HostSyncDetector()
        _DETECTOR.install()
    return _DETECTOR


def arm(on: bool) -> None:
    d = detector()
    if d is not None:
        d.armed = on


def take_calls() -> list[str]:
    """The calls recorded since the last take (and disarm)."""
    d = detector()
    if d is None:
        return []
    d.armed = False
    calls, d.calls = d.calls, []
    return calls


@contextmanager
def requested():
    """Around a device-to-host copy the caller asked for (a preview): not recorded, since
    the request pays for it knowingly; the steady step's own code around it still is."""
    d = detector()
    armed = d is not None and d.armed
    if armed:
        d.armed = False
    try:
        yield
    finally:
        if armed:
            d.armed = True
