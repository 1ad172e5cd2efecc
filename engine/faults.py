"""Testing hooks for failure handling and slow peers.

TESSERA_INJECT_FAULT="rank=R,step=S" makes rank R raise after denoising step S (images) or
chunk S (streams), so tests can check that every other rank stops fast with that cause.
`rank=all` makes every rank raise at the same point (a request that fails alone), and
`prompt=P` (images) arms it only for requests whose first prompt is P, so the same ranks
can serve the next request; several specs are separated by ";".
TESSERA_INJECT_DELAY="rank=R,load=S,request=S" makes rank R sleep S seconds before loading
its model or at the start of every request (several ranks: separate them with ";"), so
tests can check that waiting for a slow peer never trips the communicator timeout.
"""

from __future__ import annotations

import os
import time

FAULT_ENV = "TESSERA_INJECT_FAULT"
DELAY_ENV = "TESSERA_INJECT_DELAY"


def _parts(env: str):
    """The ";"-separated specs of a hook's variable, each as a dict of its fields."""
    spec = os.environ.get(env)
    return [dict(item.split("=", 1) for item in part.split(",")) for part in spec.split(";")] if spec else []


def injected_delay(rank: int, when: str) -> None:
    """Sleep as TESSERA_INJECT_DELAY asks for this rank at `when` ("load" or "request")."""
    for fields in _parts(DELAY_ENV):
        if int(fields.get("rank", -1)) == rank and when in fields:
            time.sleep(float(fields[when]))


def injected_fault_step(rank: int, prompt: str | None = None) -> int | None:
    """The step at which this rank must fail in a request for `prompt`, or None."""
    for fields in _parts(FAULT_ENV):
        if fields.get("rank") != "all" and int(fields.get("rank", -1)) != rank:
            continue
        if "prompt" in fields and fields["prompt"] != prompt:
            continue
        return int(fields.get("step", 0))
    return None
