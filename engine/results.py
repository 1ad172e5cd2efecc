"""What a request gives back: GenerateResult (images, latents, report) and VideoStream
(frames as they arrive, the stream's report at the end).

VideoStream: the iterator `Engine.stream` returns, and its report.

Frames come out one at a time, (H, W, 3) uint8 (or float32 in [0, 1] with
`float_frames=True`), as the decoding rank produces them. While a stream is open the engine
serves nothing else (`generate` or a second `stream` raise instead of waiting); exhausting
the iterator, `close()`, leaving a `with` block or dropping the stream ends it, and stopping
early stops every rank cleanly (under torchrun, ranks run to `num_chunks`).
After the end, `report` has:

- `time_to_first_frame_s`: from the request to the first decoded chunk, on the caller's clock;
- `steady_fps`: frames after the first chunk / time between the first and the last chunk;
- `per_rank`: each rank's steps, busy and wait seconds and fractions, bytes, cache sizes;
- `stage_bound_fps`: the slowest rank's frames per busy second: the throughput if every
  pipeline stage had a device of its own (on a shared CPU the ranks compete for cores).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.runtime.decode import unit_to_uint8


@dataclass
class GenerateResult:
    images: list = field(default_factory=list)  # PIL images (rank 0 / the caller)
    latents: torch.Tensor | None = None  # final latents before decoding
    report: dict = field(default_factory=dict)

    @property
    def image(self):
        return self.images[0] if self.images else None

    def save_report(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(json_safe(self.report), f, indent=2)
        return path


def json_safe(value):
    """JSON has no infinity: an identical-to-serial PSNR is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class VideoStream:
    def __init__(self, engine, request, progress: bool = False, float_frames: bool = False):
        self.engine = engine
        self.float_frames = float_frames  # float32 in [0, 1] as decoded, instead of uint8
        self.request = request
        self.progress = progress
        self.report: dict | None = None
        self._chunks = None  # the backend's generator of (chunk, frames, seconds)
        self._pending: deque = deque()
        self._arrivals: list[float] = []
        self._frames = 0
        self._done = False
        self._start = 0.0

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __next__(self) -> np.ndarray:
        if self._pending:
            return self._pending.popleft()
        if self._done:
            raise StopIteration
        if self._chunks is None:
            self._chunks = self.engine.open_stream(self)
            self._start = time.perf_counter()
        try:
            chunk, frames, _ = next(self._chunks)
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._finish(failed=True)
            raise
        self._arrivals.append(time.perf_counter() - self._start)
        self._frames += len(frames)
        self._pending.extend(frames if self.float_frames else unit_to_uint8(frames))
        if self.progress:
            fps = self._steady_fps()
            sys.stderr.write(f"\rchunk {chunk + 1}: {self._frames} frames, "
                             f"{'%.2f fps' % fps if fps else 'first frame at %.2f s' % self._arrivals[0]}   ")
            sys.stderr.flush()
        return self._pending.popleft()

    def close(self) -> None:
        """Stop the stream (every rank stops) and build the report."""
        if self._done:
            return
        if self._chunks is not None:
            try:
                self._chunks.close()
            except BaseException:
                self._finish(failed=True)
                raise
            self._finish()
        else:
            self._done = True

    def __del__(self):  # a stream dropped without close() must not keep the ranks busy
        try:
            self.close()
        except Exception:
            pass

    def _steady_fps(self) -> float | None:
        if len(self._arrivals) < 2:
            return None
        per_chunk = self._frames / len(self._arrivals)
        return per_chunk * (len(self._arrivals) - 1) / (self._arrivals[-1] - self._arrivals[0])

    def _finish(self, failed: bool = False) -> None:
        self._done = True
        per_rank = self.engine.close_stream(self)  # the engine serves the next request from here on
        if self.progress:
            sys.stderr.write("\n")
        if failed:
            return
        per_chunk = self._frames / len(self._arrivals) if self._arrivals else 0
        rates = [per_chunk * p["chunks"] / p["busy_s"] for p in per_rank if p and p["busy_s"] > 0]
        r = self.request
        self.report = {
            "model": self.engine.model, "strategy": r.strategy, "world_size": r.world_size,
            "steps": r.steps, "kv_window": r.kv_window, "height": r.height, "width": r.width,
            "seed": r.seed, "chunks": len(self._arrivals), "frames": self._frames,
            "elapsed_s": time.perf_counter() - self._start,
            "time_to_first_frame_s": self._arrivals[0] if self._arrivals else None,
            "steady_fps": self._steady_fps(),
            "stage_bound_fps": min(rates) if rates else None,
            "chunk_arrival_s": self._arrivals,
            "per_rank": per_rank,
            "launch": self.engine.launch,
        }
