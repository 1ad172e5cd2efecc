"""Testing hooks for failure handling and slow peers.

TESSERA_INJECT_FAULT="rank=R,step=S" makes rank R raise after denoising step S (images) or
chunk S (streams), so tests can check that every other rank stops fast with that cause.
TESSERA_INJECT_DELAY="rank=R,load=S,request=S" makes rank R sleep S seconds before loading
its model or at the start of every request (several ranks: separate them with ";"), so
tests can check that waiting for a slow peer never trips the communicator timeout.
"""

from __future__ import annotations

import os
import time

FAULT_ENV = "TESSERA_INJECT_FAULT"
DELAY_ENV = "TESSERA_INJECT_DELAY"


def injected_delay(rank: int, when: str) -> None:
    """Sleep as TESSERA_INJECT_DELAY asks for this rank at `when` ("load" or "request")."""
    spec = os.environ.get(DELAY_ENV)
    if not spec:
        return
    for part in spec.split(";"):
        fields = dict(item.split("=", 1) for item in part.split(","))
        if int(fields.get("rank", -1)) == rank and when in fields:
            time.sleep(float(fields[when]))


def injected_fault_step(rank: int) -> int | None:
    """The step at which this rank must fail, or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fields = dict(item.split("=", 1) for item in spec.split(","))
    if int(fields.get("rank", -1)) != rank:
        return None
    return int(fields.get("step", 0))
