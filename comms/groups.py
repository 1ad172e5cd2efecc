"""Process groups and topology: the one place that creates torch.distributed groups.

A rank's device is always its *local* device (LOCAL_RANK on CUDA), never cuda:{global
rank}, so multi-node launches work. CUDA gets NCCL, CPU gets gloo; the rest of the code
does not care which.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now at `host` ("" for every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening_store(host: str, timeout_s: float):
    """A rendezvous store server that listens on `host` only, on a free port (`.port`).
    TCPStore binds the wildcard whatever host it is given, so the listening socket is bound
    here and handed over (torch.distributed has no authentication: never listen wider than
    the deployment needs)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    return dist.TCPStore(host, port, None, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False, master_listen_fd=sock.detach())  # the store owns the socket now


def client_store(host: str, port: int, timeout_s: float):
    """A client of the rendezvous store at host:port."""
    return dist.TCPStore(host, port, None, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def loopback_interface() -> str:
    """The name of the loopback network interface ("lo" on Linux, "lo0" elsewhere)."""
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), "lo")


def pin_to_loopback(env) -> None:
    """Single-machine runs: gloo and NCCL listen and connect on the loopback interface only
    (otherwise gloo binds whatever address the host name resolves to)."""
    lo = loopback_interface()
    env["GLOO_SOCKET_IFNAME"] = lo
    env["NCCL_SOCKET_IFNAME"] = lo


def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun or a spawner, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local_rank


def local_device(local_rank: int, requested: str | torch.device | None = None) -> torch.device:
    """The device this rank computes on: the requested one, else its local GPU, else CPU.
    A local rank without a GPU of its own is refused: two ranks on one GPU would share it
    silently (and NCCL refuses two ranks of one communicator on one device)."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", _own_gpu(local_rank))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", _own_gpu(local_rank))
    return torch.device("cpu")


def _own_gpu(local_rank: int) -> int:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: {count} visible on this machine. Launch at "
            f"most {count} rank(s) per machine (torchrun --nproc-per-node {count}), or pass device='cpu'.")
    return local_rank


def ray_local_gpu(local_rank: int) -> int:
    """A Ray actor's GPU index: the one Ray assigned (ray.get_gpu_ids()), as seen through
    CUDA_VISIBLE_DEVICES when Ray set it; `local_rank` for actors without a GPU."""
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        return local_rank
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        if ids[0] not in visible:
            raise RuntimeError(f"Ray assigned GPU {ids[0]}, which CUDA_VISIBLE_DEVICES={visible} hides")
        return visible.index(ids[0])
    return int(ids[0])


def default_store():
    """The rendezvous store of the default process group."""
    return dist.distributed_c10d._get_default_store()


def wait_in_store(ready, first_s: float = 0.0005, most_s: float = 0.02) -> None:
    """Poll `ready()` (a store query) until it holds, the pause doubling from `first_s` up
    to `most_s`. Never times out: a peer that fails instead ends this process through
    comms.failure."""
    pause = first_s
    while not ready():
        time.sleep(pause)
        pause = min(most_s, pause * 2)


def store_barrier(topo: "Topology", name: str) -> None:
    """Wait, in the rendezvous store, until every rank has arrived here. Unlike a
    collective it never times out: it guards the waits whose length no communicator timeout
    can bound (a peer still loading its model, rank 0 still comparing against serial). A
    rank that fails instead of arriving stops the others through comms.failure."""
    if not topo.distributed:
        return
    topo.barriers += 1
    key = f"tessera/barrier/{name}/{topo.barriers}"
    store = default_store()
    if store.add(key, 1) < topo.world_size:
        wait_in_store(lambda: store.add(key, 0) >= topo.world_size)


def differing_in_store(topo: "Topology", name: str, fields: dict[str, str]) -> list[str]:
    """Publish this rank's `fields` (name -> digest) in the store, meet every rank, and return
    the names on which any rank differs: every rank gets the same answer. Each rank keeps at
    most two keys there (the one before this is deleted once every rank is past reading it)."""
    import json

    if not topo.distributed:
        return []
    store = default_store()
    topo.agreements += 1
    key = f"tessera/agree/{name}/{{n}}/{{rank}}"
    store.set(key.format(n=topo.agreements, rank=topo.rank), json.dumps(fields))
    store_barrier(topo, f"agree-{name}")  # every rank has published; the last round's keys are all read
    if topo.agreements > 1:
        store.delete_key(key.format(n=topo.agreements - 1, rank=topo.rank))
    every = [json.loads(store.get(key.format(n=topo.agreements, rank=r))) for r in range(topo.world_size)]
    return sorted({f for f in set().union(*every) if len({json.dumps(e.get(f)) for e in every}) > 1})


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Topology:
    """Who this rank is and which groups it belongs to.

    `world` spans every rank. With CFG split the world is cut into two halves
    (`cfg_groups`): the first half denoises the unconditional batch, the second the
    conditional one; patch parallelism then runs inside each half.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    world: object = None  # the default process group (None = dist.group.WORLD)
    cfg_groups: list = field(default_factory=list)
    timeout_s: float = DEFAULT_TIMEOUT_S
    _side: object = None
    _output: object = None
    barriers: int = 0  # store barriers passed (each uses a fresh key)
    agreements: int = 0  # rounds of differing_in_store passed

    def side_group(self):
        """A second group over every rank, for traffic that must not queue behind the main
        group's operations (NCCL runs a communicator's operations in order). Created on
        first use, which every rank must reach at the same point (new_group is collective)."""
        if self._side is None:
            self._side = dist.new_group(list(range(self.world_size)),
                                        timeout=datetime.timedelta(seconds=self.timeout_s))
        return self._side

    def output_group(self):
        """A group over every rank for the denoiser's prediction gather, so it never queues
        behind the stale posts of the step on the patch communicator (NCCL runs one
        communicator's operations in order). Created on first use like `side_group`;
        None without a process group (isolated ranks)."""
        if self._output is None and self.distributed and dist.is_initialized():
            self._output = dist.new_group(list(range(self.world_size)),
                                          timeout=datetime.timedelta(seconds=self.timeout_s))
        return self._output

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def patch_group(self, cfg_split: bool):
        """(group, ranks) in which this rank shares a latent with its band neighbours."""
        if not cfg_split:
            return self.world, list(range(self.world_size))
        half = self.world_size // 2
        index = self.rank // half
        return self.cfg_groups[index], list(range(index * half, (index + 1) * half))


def init_distributed(
    rank: int,
    world_size: int,
    local_rank: int,
    device: str | torch.device | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    store=None,
) -> Topology:
    """Join the process group described by MASTER_ADDR/MASTER_PORT and build subgroups.

    The timeout bounds every collective, so a vanished peer turns into an error instead
    of a hang; failures raised by a peer are reported faster by `comms.failure`.
    """
    from comms import wire_check

    wire_check.install_from_env()  # testing hooks only: off unless their variables are set
    dev = local_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    topo = Topology(rank, world_size, local_rank, dev, timeout_s=timeout_s)
    if world_size == 1:
        return topo
    if not dist.is_initialized():
        kwargs = {"store": store} if store is not None else {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend=backend_for(dev),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    topo.world = dist.group.WORLD
    if world_size % 2 == 0:
        # new_group is collective over the whole world: every rank creates both halves.
        half = world_size // 2
        topo.cfg_groups = [
            dist.new_group(list(range(0, half)), timeout=datetime.timedelta(seconds=timeout_s)),
            dist.new_group(list(range(half, world_size)), timeout=datetime.timedelta(seconds=timeout_s)),
        ]
    return topo


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
