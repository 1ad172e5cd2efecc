"""Testing hook for failure handling.

TESSERA_INJECT_FAULT="rank=R,step=S" makes rank R raise after denoising step S (images) or
chunk S (streams), so tests can check that every other rank stops fast with that cause.
"""

from __future__ import annotations

import os

FAULT_ENV = "TESSERA_INJECT_FAULT"


def injected_fault_step(rank: int) -> int | None:
    """The step at which this rank must fail, or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fields = dict(item.split("=", 1) for item in spec.split(","))
    if int(fields.get("rank", -1)) != rank:
        return None
    return int(fields.get("step", 0))
