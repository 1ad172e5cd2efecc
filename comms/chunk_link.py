"""The only traffic of `tpp`: a chunk's latent from one pipeline rank to the next.

Each message has two parts: a control word through the rendezvous store (the chunk index,
or STOP for "the stream ends here") and the latent by point-to-point, whose shape both
sides know from the request. The control word lives on the host, so the receiver decides
whether a latent follows without reading anything back from the device (no host-device
synchronisation in a steady stream), and a receiver waiting for a slow upstream (the
consumer holds rank 0 back) waits in the store, in short rounds, never inside a
communicator operation that would trip its timeout. Sends are asynchronous so a rank
starts its next chunk at once; the previous send is finished (on the stream, not the host)
before the next. Latents between two ranks match in order (NCCL ignores tags; gloo too).
"""

from __future__ import annotations

import torch

import comms.wire as wire
from comms.groups import default_store, wait_in_store

STOP = -1
LATENT_TAG = 7202
POLL_S = (0.0002, 0.005)  # a waiting receiver checks the store this often: first, and at most


class ChunkLink:
    def __init__(self, rank: int, shape, dtype, device, stats, group=None, stream_id: int = 0, store=None):
        self.rank = rank  # sends to rank + 1, receives from rank - 1
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.stats, self.group = stats, group
        self.store = store if store is not None else default_store()
        self.prefix = f"tessera/tpp/{stream_id}"  # every stream has its own keys
        self._sent = self._received = 0  # messages so far, each direction
        self._in_flight = None  # (buffer, work) of the last send

    def _key(self, sender: int, index: int) -> str:
        return f"{self.prefix}/{sender}/{index}"

    def _finish_send(self) -> None:
        if self._in_flight is not None:
            with self.stats.waiting(self.device):
                self._in_flight[1].wait()
            self._in_flight = None

    def send(self, chunk: int, latent: torch.Tensor | None) -> None:
        """To the next rank: `latent` of `chunk`, or (chunk=STOP, latent=None) the end."""
        self._finish_send()
        sent = 0
        # The control word first: the receiver posts its receive as soon as it reads it.
        self.store.set(self._key(self.rank, self._sent), str(chunk))
        self._sent += 1
        if latent is not None:
            payload = latent.detach().contiguous()
            self._in_flight = (payload, wire.isend(payload, self.rank + 1, self.group, LATENT_TAG))
            sent = payload.numel() * payload.element_size()
        self.stats.record_op(sent, 0, kind="chunk")

    def _control(self) -> int:
        key = self._key(self.rank - 1, self._received)
        self._received += 1
        # `check`, not a timed `wait`: the wait may be long (the consumer sets the pace) and
        # must never time out; a failed peer ends this process through comms.failure.
        with self.stats.waiting():  # host clock: the store wait is on the host
            wait_in_store(lambda: self.store.check([key]), *POLL_S)
        value = int(self.store.get(key))
        self.store.delete_key(key)
        return value

    def recv(self) -> tuple[int, torch.Tensor | None]:
        """From the previous rank: (chunk, latent) or (STOP, None)."""
        chunk = self._control()
        if chunk == STOP:
            return STOP, None
        latent = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        with self.stats.waiting(self.device):  # on CUDA the compute stream waits, not the host
            wire.irecv(latent, self.rank - 1, self.group, LATENT_TAG).wait()
        self.stats.record_op(0, latent.numel() * latent.element_size(), kind="chunk")
        return chunk, latent

    def close(self) -> None:
        self._finish_send()
