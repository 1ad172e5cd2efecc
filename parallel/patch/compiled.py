"""torch.compile of a patch-parallel denoiser (`ParallelConfig(compile=True)`, `--compile`).

The denoiser's `forward` is replaced by a dispatcher: steps that repeat (every step of
`patch-sync`, the bucketed stale steps of `patch` and `pcpp`, every step without a row
split) run the compiled forward; the warm-up steps and the first stale step, which records
the buckets, and the first bucketed step run eagerly (once per request each: compiling their variant would cost more
than it saves). The split and gather hooks stay outside the compiled region.

Inside it the parallel layers are traced with the model: the bucketed exchange's writes
into send views and reads of receive views are graph operations, and only a bucket's
launch, a wait on a handle, and a synchronous exchange are opaque calls (graph breaks;
`comms.exchange`). Layers read per-step constants from the context (`ctx.sync`), never
the step number, so steady steps reuse one compilation.
"""

from __future__ import annotations

import os

import torch

# The compiler backend: inductor unless this names another (the test suite uses
# "aot_eager": the same tracing and functionalization, without inductor's C++ builds).
BACKEND_ENV = "TESSERA_COMPILE_BACKEND"

# Each graph break resumes in the frame of the layer that broke, compiled once per module
# instance that breaks (a few per step); the default limit of 8 per code object is too low.
RECOMPILE_LIMIT = 256


class CompiledForward:
    """Stands in for `module.forward`: compiled when the context says so, else eager."""

    def __init__(self, module: torch.nn.Module, ctx):
        self.eager = module.forward
        self.ctx = ctx
        self._compiled = None

    def __call__(self, *args, **kwargs):
        if not self.ctx.compile_step:
            return self.eager(*args, **kwargs)
        if self._compiled is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            backend = os.environ.get(BACKEND_ENV) or "inductor"
            self._compiled = torch.compile(self.eager, backend=backend, dynamic=False)
        return self._compiled(*args, **kwargs)


def install_compiled(module: torch.nn.Module, ctx) -> CompiledForward:
    """Route `module`'s forward through a CompiledForward (once; hooks keep working)."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, CompiledForward):
        return forward
    forward = CompiledForward(module, ctx)
    module.forward = forward
    return forward
