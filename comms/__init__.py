"""Communication layer: the only package that calls torch.distributed.

Nothing here knows about diffusion: process groups and topology (`groups`), stale
exchanges of tensors between members (`exchange`), accounting (`stats`), fail-fast
propagation of a rank's error (`failure`) and object helpers (`collectives`).
"""

from comms.exchange import StaleExchange
from comms.groups import Topology, init_distributed, local_device, shutdown
from comms.stats import CommStats

__all__ = ["StaleExchange", "Topology", "init_distributed", "local_device", "shutdown", "CommStats"]
