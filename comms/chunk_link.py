"""The only traffic of `tpp`: a chunk's latent from one pipeline rank to the next.

Each message is a header (chunk index, or -1 for "the stream ends here") followed by the
latent, whose shape both sides know from the request. Sends are asynchronous so a rank
starts its next chunk at once; at most one send per rank is in flight (the previous one is
waited for before the next), which bounds memory and keeps a fast rank from running away.
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

    def _finish_send(self) -> None:
        if self._in_flight is not None:
            for work in self._in_flight[1]:
                work.wait()
            self._in_flight = None

    def send(self, chunk: int, latent: torch.Tensor | None) -> None:
        """To the next rank: `latent` of `chunk`, or (chunk=STOP, latent=None) the end."""
        with self.stats.waiting(self.device):
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
        with self.stats.waiting(self.device):
            dist.irecv(header, peer, self.group, HEADER_TAG).wait()
            chunk = int(header.item())
            if chunk == STOP:
                self.stats.record_op(0, 8, kind="chunk")
                return STOP, None
            latent = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            dist.irecv(latent, peer, self.group, LATENT_TAG).wait()
        self.stats.record_op(0, 8 + latent.numel() * latent.element_size(), ops=2, kind="chunk")
        return chunk, latent

    def close(self) -> None:
        with self.stats.waiting(self.device):
            self._finish_send()
