"""The only traffic of `tpp`: a chunk's latent from one pipeline rank to the next.

Each message is a header (chunk index, or -1 for "the stream ends here") followed by the
latent, whose shape both sides know from the request. Sends are asynchronous so a rank
starts its next chunk at once; at most one send per rank is in flight (the previous one is
waited for, on the host, before the next), which bounds memory and how far a fast rank runs
ahead. Messages between two ranks match in order (NCCL ignores tags; gloo matches them too).
Waits are timed on the host; on CUDA the wait includes syncing the current stream, so the
time is the real stall.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

STOP = -1
HEADER_TAG = 7201
LATENT_TAG = 7202


class ChunkLink:
    def __init__(self, rank: int, shape, dtype, device, stats, group=None):
        self.rank = rank  # sends to rank + 1, receives from rank - 1
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.stats, self.group = stats, group
        self._in_flight = None  # (buffers, works) of the last send

    def _wait(self, works) -> None:
        with self.stats.waiting():  # host clock (no device): the stall this rank really sees
            for work in works:
                work.wait()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()

    def _finish_send(self) -> None:
        if self._in_flight is not None:
            self._wait(self._in_flight[1])
            self._in_flight = None

    def send(self, chunk: int, latent: torch.Tensor | None) -> None:
        """To the next rank: `latent` of `chunk`, or (chunk=STOP, latent=None) the end."""
        self._finish_send()
        header = torch.tensor([chunk], dtype=torch.int64, device=self.device)
        peer = self.rank + 1
        works = [dist.isend(header, peer, self.group, HEADER_TAG)]
        buffers = [header]
        sent = header.numel() * header.element_size()
        if latent is not None:
            payload = latent.detach().contiguous()
            works.append(dist.isend(payload, peer, self.group, LATENT_TAG))
            buffers.append(payload)
            sent += payload.numel() * payload.element_size()
        self.stats.record_op(sent, 0, ops=len(works), kind="chunk")
        self._in_flight = (buffers, works)

    def recv(self) -> tuple[int, torch.Tensor | None]:
        """From the previous rank: (chunk, latent) or (STOP, None)."""
        peer = self.rank - 1
        header = torch.empty(1, dtype=torch.int64, device=self.device)
        size = header.numel() * header.element_size()
        self._wait([dist.irecv(header, peer, self.group, HEADER_TAG)])
        chunk = int(header.item())
        if chunk == STOP:
            self.stats.record_op(0, size, kind="chunk")
            return STOP, None
        latent = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._wait([dist.irecv(latent, peer, self.group, LATENT_TAG)])
        self.stats.record_op(0, size + latent.numel() * latent.element_size(), ops=2, kind="chunk")
        return chunk, latent

    def close(self) -> None:
        self._finish_send()
