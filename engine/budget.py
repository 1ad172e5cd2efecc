"""A bound on request sizes: an estimate of the memory one rank needs, checked on the caller
before any rank works (a 100000-pixel side would otherwise allocate for minutes or die).

The estimate is deliberately simple and errs high: one fp32 self-attention score matrix at
the latent resolution for the rank's band of queries against every key (what an attention
kernel without a fused path materialises per head; ASG attends within native-size tiles),
plus the VAE decoder's full-resolution activations (128 channels, three live tensors, as
in the SD VAE) for the rank's share of the image rows.
"""

from __future__ import annotations

import math
import os

from parallel.config import ConfigError, is_number
from parallel.registry import strategy_of

FP32 = 4
DECODER_CHANNELS = 128
LIVE_DECODER_TENSORS = 3


def estimate_rank_bytes(info, request) -> int:
    """Bytes one rank of `request` needs at least, by the rule in the module docstring."""
    vae = info.vae_scale_factor
    world = request.parallel.world_size or 1
    strategy = strategy_of(request.parallel)
    if strategy.runner == "tiles":
        tokens = (info.native_size // vae) ** 2
        queries = tokens
    else:
        tokens = (request.height // vae) * (request.width // vae)
        members = world // 2 if request.cfg_split else world
        queries = math.ceil(tokens / members) if strategy.splits_rows else tokens
    attention = FP32 * queries * tokens
    decode = FP32 * DECODER_CHANNELS * LIVE_DECODER_TENSORS * request.height * request.width * len(request.prompt)
    return attention + math.ceil(decode / world)


def machine_bytes_per_rank(local_ranks: int | None, device_type: str) -> int | None:
    """This machine's memory shared by its ranks: a GPU's memory each on CUDA, else RAM / ranks.
    None when this machine does not tell (ranks elsewhere, e.g. a Ray cluster: `local_ranks`
    None; or CUDA ranks while this process sees no GPU)."""
    if local_ranks is None:
        return None
    if device_type == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return None
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(count))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_ranks)


def check_request_memory(info, request, local_ranks: int, device_type: str = "cpu", limit_gb=None) -> None:
    """Refuse a request whose estimate exceeds `limit_gb` per rank (None: this machine's
    memory per rank; math.inf: no bound)."""
    if limit_gb is not None and (not is_number(limit_gb) or not limit_gb > 0):
        raise ConfigError(f"memory_limit_gb must be a positive number (inf: no bound), got {limit_gb!r}")
    if limit_gb is None:
        limit, source = machine_bytes_per_rank(local_ranks, device_type), "this machine's memory per rank"
        if limit is None:
            return  # the ranks' machines are not this one: only an explicit memory_limit_gb bounds them
    else:
        limit, source = limit_gb * 2**30, "memory_limit_gb"
    need = estimate_rank_bytes(info, request)
    if need > limit:
        raise ConfigError(
            f"{request.height}x{request.width} needs an estimated {need / 2**30:,.1f} GiB per rank, over the limit "
            f"of {limit / 2**30:,.1f} GiB ({source}); use a smaller size or more ranks, or raise the bound with "
            "memory_limit_gb (CLI: --memory-limit-gb; inf: no bound)")
