"""How local ranks are started: forked from a server that imported torch and diffusers once.

A rank started by `spawn` imports torch, diffusers and transformers itself, about 9 s of CPU
on the machines measured here, every time a group starts or restarts. A `forkserver` imports
them once (in a small server process started with the first group) and forks every later
rank from it: the rank still imports the caller's main module, as with spawn, but not the
libraries again. Nothing has run a kernel in the server (no OpenMP pool, no CUDA context),
so the forked ranks start clean (tests/test_processes.py checks that importing PRELOAD calls no
torch.cuda function: a CUDA driver initialised before fork would break every forked rank). The caller passes its environment along and each rank
adopts it first (`adopt_environment`), so variables set after the server started still reach
the ranks, as with spawn. Where forkserver does not exist (Windows) or
TESSERA_START_METHOD=spawn is set, ranks are spawned as before.
"""

from __future__ import annotations

import os
import sys

import torch.multiprocessing as mp

ENV = "TESSERA_START_METHOD"
# What every rank imports before it can load a model; the server imports them once.
PRELOAD = ["torch", "torch.distributed", "diffusers", "transformers", "engine.runtime.image", "launch.worker"]


# The resource tracker (a helper process multiprocessing starts with the first queue) warns
# about "leaked semaphores" when the launcher was killed (-9) and cleans them up anyway: a
# message that means nothing to a user. It takes its warning filters from sys.warnoptions.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def rank_context():
    """The multiprocessing context local ranks are started with."""
    if QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(QUIET_TRACKER)
    method = os.environ.get(ENV) or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if method not in ("forkserver", "spawn"):
        from parallel.errors import ConfigError

        raise ConfigError(f"{ENV}={method!r}: choose forkserver or spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
        _start_fork_server()
    return ctx


def _start_fork_server() -> None:
    """Start the fork server (once per process) with torch's C++ log level at ERROR unless
    the caller chose one: c10 reads it when torch is imported, which happens in the server.
    A rank whose launcher was killed would otherwise print the store client's C++ stack trace
    before its own one-line message (comms.failure) when the two race."""
    from multiprocessing import forkserver

    chosen = "TORCH_CPP_LOG_LEVEL" in os.environ
    if not chosen:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        forkserver.ensure_running()
    finally:
        if not chosen:
            del os.environ["TORCH_CPP_LOG_LEVEL"]


def adopt_environment(env: dict) -> None:
    """Give a forked rank the caller's environment as of now, as spawn would: a rank forked
    from the server would otherwise see the environment of when the server started."""
    os.environ.clear()
    os.environ.update(env)
