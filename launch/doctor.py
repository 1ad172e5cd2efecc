"""`tessera doctor`: what this machine can do, before a first run.

Each check gives a value and what it means for the strategies. It only looks: no
model is loaded, no rank and no Ray cluster is started (RAY_ADDRESS gets a TCP connect
with a short timeout). Exit code 0 whatever it finds; `--json` for scripts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from dataclasses import asdict, dataclass, field

RAY_CONNECT_TIMEOUT_S = 2.0
FEW_CORES = 4  # below this many cores per CPU machine, ranks mostly compete for them


@dataclass
class Check:
    name: str
    value: str
    meaning: str = ""
    details: dict = field(default_factory=dict)


def add_parser(sub) -> None:
    doc = sub.add_parser("doctor", help="check torch, GPUs, NCCL/gloo, xformers, Ray, cores and memory")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_torch() -> list[Check]:
    import torch
    import torch.distributed as dist

    cuda, gpus = torch.version.cuda, torch.cuda.device_count() if torch.cuda.is_available() else 0
    build = f"CUDA {cuda} build" if cuda else ("ROCm build" if getattr(torch.version, "hip", None) else "CPU build")
    checks = [Check("torch", f"{torch.__version__}, {build}",
                    "" if cuda else "CPU-only torch: GPUs stay unused even if present; a CUDA build is needed for them",
                    {"version": torch.__version__, "cuda": cuda})]
    if gpus:
        props = [torch.cuda.get_device_properties(i) for i in range(gpus)]
        listed = "; ".join(f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB" for i, p in enumerate(props))
        meaning = (f"up to {gpus} local rank(s), one GPU each" +
                   ("; one GPU: strategies run (and equal serial in exact modes) but cannot speed up"
                    if gpus == 1 else ""))
        checks.append(Check("GPUs", f"{gpus} ({listed})", meaning,
                            {"count": gpus, "names": [p.name for p in props],
                             "memory_bytes": [p.total_memory for p in props]}))
    else:
        checks.append(Check("GPUs", "none visible", "no GPU: ranks run on CPU with gloo; exactness and correctness "
                            "only, not speed", {"count": 0}))
    nccl, gloo = dist.is_available() and dist.is_nccl_available(), dist.is_available() and dist.is_gloo_available()
    nccl_version = ".".join(map(str, torch.cuda.nccl.version())) if nccl and cuda else None
    checks.append(Check("NCCL", f"available{f' ({nccl_version})' if nccl_version else ''}" if nccl else "not available",
                        ("GPU ranks exchange over NCCL" if gpus else "unused without a GPU") if nccl
                        else ("GPU ranks cannot talk to each other: multi-GPU runs fail" if gpus
                              else "not needed on CPU"), {"available": nccl, "version": nccl_version}))
    checks.append(Check("gloo", "available" if gloo else "not available",
                        "CPU ranks (and the tests) exchange over gloo" if gloo
                        else "no multi-rank runs on CPU", {"available": gloo}))
    return checks


def check_xformers() -> Check:
    """Usable means an attention call on a small CUDA tensor works, not only the import."""
    import torch

    version = _version("xformers")
    if version is None:
        return Check("xformers", "not installed", "optional: attention uses torch's scaled_dot_product_attention",
                     {"installed": False, "usable": False})
    if not torch.cuda.is_available():
        return Check("xformers", f"{version} installed, not applicable (no GPU)",
                     "its kernels are CUDA-only; attention uses torch's scaled_dot_product_attention",
                     {"installed": True, "usable": False})
    try:
        import xformers.ops

        q = torch.randn(1, 16, 2, 32, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as exc:  # wrong build for this torch/CUDA: the import works, the kernels do not
        return Check("xformers", f"{version} installed but not usable: {type(exc).__name__}: {str(exc)[:120]}",
                     "attention uses torch's scaled_dot_product_attention", {"installed": True, "usable": False})
    return Check("xformers", f"{version}, usable on CUDA", "optional; never needed",
                 {"installed": True, "usable": True})


def check_libraries() -> list[Check]:
    versions = {name: _version(name) for name in ("diffusers", "transformers")}
    return [Check(name, v or "not installed", "" if v else "needed by every model: pip install -e .",
                  {"version": v}) for name, v in versions.items()]


def _ray_target(address: str) -> tuple[str, int] | None:
    """host and port of a RAY_ADDRESS ('HOST:PORT' or 'ray://HOST:PORT'); None for 'auto' etc."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def check_ray(env=None) -> Check:
    env = os.environ if env is None else env
    version = _version("ray") if importlib.util.find_spec("ray") else None
    if version is None:
        return Check("Ray", "not installed", "--launcher ray unavailable; local ranks and torchrun work",
                     {"installed": False})
    address = env.get("RAY_ADDRESS")
    if not address:
        return Check("Ray", f"{version}, RAY_ADDRESS not set",
                     "--launcher ray starts a private one-node cluster (seconds); --address joins one",
                     {"installed": True, "version": version, "address": None})
    target = _ray_target(address)
    if target is None:
        return Check("Ray", f"{version}, RAY_ADDRESS={address} (not checked)",
                     "only HOST:PORT addresses are checked here", {"installed": True, "address": address})
    try:
        socket.create_connection(target, timeout=RAY_CONNECT_TIMEOUT_S).close()
        reached = True
    except OSError:
        reached = False
    meaning = ("--launcher ray will join this cluster" if reached
               else "nothing answers there: --launcher ray would fail; start the cluster or unset RAY_ADDRESS")
    return Check("Ray", f"{version}, RAY_ADDRESS={address} {'reachable' if reached else 'unreachable'}", meaning,
                 {"installed": True, "version": version, "address": address, "reachable": reached})


def _memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) from /proc/meminfo; (None, None) elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        return None, None


def check_host(gpus: int) -> list[Check]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if gpus:
        meaning = "host threads issue the GPU work; each rank needs at least one"
    elif cores < FEW_CORES:
        meaning = f"{cores} cores: parallel runs show overheads, not speed-ups (the ranks share the cores)"
    else:
        meaning = f"{cores} cores: each local rank gets cores / ranks threads"
    total, available = _memory_bytes()
    mem = (f"{total / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available" if total and available
           else "unknown")
    return [Check("cores", str(cores), meaning, {"cores": cores}),
            Check("memory", mem, "every local rank holds the whole model (shapes-sd: about 0.4 GB per rank on CPU)",
                  {"total_bytes": total, "available_bytes": available})]


def checks() -> list[Check]:
    found = check_torch()
    gpus = next(c.details["count"] for c in found if c.name == "GPUs")
    return found + [check_xformers()] + check_libraries() + [check_ray()] + check_host(gpus)


def render(found: list[Check]) -> str:
    width = max(len(c.name) for c in found) + 2
    lines = []
    for c in found:
        lines.append(f"{c.name:<{width}}{c.value}")
        if c.meaning:
            lines.append(f"{'':<{width}}-> {c.meaning}")
    return "\n".join(lines)


def doctor_command(args) -> int:
    found = checks()
    print(json.dumps([asdict(c) for c in found], indent=2) if args.json else render(found))
    return 0
