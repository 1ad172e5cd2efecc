"""Communication layer: the only package that calls torch.distributed.

Nothing here knows about diffusion: process groups and topology (`groups`), stale
exchanges of tensors between members (`exchange`), accounting (`stats`), fail-fast
propagation of a rank's error (`failure`), object helpers (`collectives`), bucketed static
buffers (`buckets`), the wire and its NCCL-order checks (`wire`, `wire_check`), index swaps
and sends for tiled methods (`asg_channel`) and a stream's chunk link (`chunk_link`).
"""

from comms.exchange import StaleExchange
from comms.groups import Topology, init_distributed, local_device, shutdown
from comms.stats import CommStats

__all__ = ["StaleExchange", "Topology", "init_distributed", "local_device", "shutdown", "CommStats"]
