"""What the Engine drives: one Backend per engine, chosen by `Engine.from_pretrained`.

- `launch.inprocess.InProcess`: serial, or this process as one rank of a torchrun job;
- `launch.local.LocalLauncher`: N spawned local ranks, driven over queues;
- `launch.ray_launcher.RayLauncher`: N Ray actors on one node or a cluster.

A failing rank surfaces as `launch.worker.RankFailedError` naming it, on every backend.
"""

from __future__ import annotations

from typing import Iterator, Protocol


class Backend(Protocol):
    closed: bool
    info: object  # the model's ModelInfo / VideoInfo, as the ranks loaded it

    def run(self, request, on_preview=None) -> object:
        """Run one image request on every rank; rank 0's RankOutput (a torchrun rank: its own).
        `on_preview(step, preview)` receives rank 0's previews, if the request asks for them."""

    def stream(self, request) -> Iterator[tuple[int, list, float]]:
        """A stream request: (chunk, frames, seconds) as the decoding rank produces them;
        closing the iterator stops every rank. When it ends, `last_reports` holds every
        rank's report."""

    last_reports: list

    def close(self) -> None:
        """Stop the ranks and free what they hold."""
