"""Which attention kernel the patch-aware processors run: SDPA, or xformers on CUDA.

The exact configuration must equal serial, and the serial path is diffusers' own
processors, so the kernel is chosen once per model for both: with xformers the runtime
switches the pipeline to diffusers' xformers processors *before* the patch processors wrap
them (the unsplit path) and the patch processors call xformers too (the split path).
`auto` takes xformers where it is installed and runs on the rank's CUDA device, for UNet
models (diffusers' xformers processors for joint/Flux attention are not patch-parallel
here); `TESSERA_ATTENTION=sdpa|xformers|auto` overrides it on every rank.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from parallel.errors import ConfigError

ENV = "TESSERA_ATTENTION"
KERNELS = ("auto", "sdpa", "xformers")

# (batch, tokens, heads, dim) query, key, value -> (batch, tokens, heads, dim)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _xformers_kernel() -> Kernel | None:
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # not installed, or built for another torch
        return None
    return memory_efficient_attention  # takes and returns (B, M, H, K): our layout already


def choose_kernel(device: torch.device, unet: bool, requested: str | None = None) -> str:
    """'sdpa' or 'xformers' for a model on `device` (`requested` defaults to $TESSERA_ATTENTION or auto)."""
    requested = requested or os.environ.get(ENV, "auto")
    if requested not in KERNELS:
        raise ConfigError(f"{ENV}={requested!r}: choose one of {', '.join(KERNELS)}")
    usable = device.type == "cuda" and unet and _xformers_kernel() is not None
    if requested == "xformers" and not usable:
        raise ConfigError("xformers attention needs a CUDA device, a UNet model and the xformers package "
                          "(pip install -e '.[cuda]'); unset TESSERA_ATTENTION to use SDPA")
    return "xformers" if requested == "xformers" or (requested == "auto" and usable) else "sdpa"


def kernel_function(name: str) -> Kernel | None:
    """The callable `attend` uses for `name`; None for SDPA (attend's own path)."""
    return _xformers_kernel() if name == "xformers" else None
