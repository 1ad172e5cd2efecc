"""Local ranks fork from a server that preloaded torch and diffusers (launch/processes.py).
Forking is only safe for CUDA if nothing in the server touched CUDA: importing the preload
modules must call no torch.cuda function (a driver initialised before fork breaks every
forked rank on a GPU machine, which this CPU machine would never show)."""

import os
import subprocess
import sys

from launch.processes import PRELOAD

HARMLESS = {"_is_compiled"}  # whether torch was built with CUDA: no driver call
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import sys, torch
called = []
for name in [n for n in dir(torch.cuda) if callable(getattr(torch.cuda, n)) and not n[0].isupper()]:
    original = getattr(torch.cuda, name)
    setattr(torch.cuda, name, lambda *a, _o=original, _n=name, **k: called.append(_n) or _o(*a, **k))
for module in sys.argv[1:]:
    __import__(module)
print(",".join(sorted(set(called))))
"""


def test_the_preload_touches_no_cuda():
    out = subprocess.run([sys.executable, "-c", PROBE, *PRELOAD], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    called = set(filter(None, out.stdout.strip().split(","))) - HARMLESS
    assert not called, f"torch.cuda functions called while preloading: {sorted(called)}"
