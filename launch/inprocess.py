"""The in-process backend: serial, or this process as one rank of a torchrun job."""

from __future__ import annotations

from comms import groups
from parallel.config import ParallelConfig


class InProcess:
    """Serial, or one rank of a torchrun job: the runtime lives in this process."""

    def __init__(self, model, parallel: ParallelConfig, rank, world, local_rank, device, dtype, setup=None):
        from engine.runtime.image import make_runtime

        self.watch = None
        self.closed = False
        self.last_reports: list = []
        if world > 1:
            from comms.failure import FailureWatch, store_address

            address = store_address()
            if address:
                self.watch = FailureWatch(rank, *address)
        try:
            topo = groups.init_distributed(rank, world, local_rank, device, parallel.comm_timeout_s)
            self.runtime = make_runtime(model, topo, dtype, setup)
            # torchrun: every rank makes its own request (launched ranks all get the caller's one)
            self.runtime.requests_per_rank = world > 1
        except BaseException as exc:
            self._report(exc)
            raise
        self.info = self.runtime.info

    def _report(self, exc):
        if self.watch is not None:
            self.watch.report(exc)

    def run(self, request, on_preview=None):
        errors = []

        def sink(step, preview):  # a callback that raises must not fail this rank alone (torchrun)
            if not errors:
                try:
                    on_preview(step, preview)
                except Exception as exc:  # the caller's code
                    errors.append(exc)

        self.runtime.preview_sink = sink if on_preview is not None else None
        try:
            output = self.runtime.run(request)
        except BaseException as exc:
            self._report(exc)
            raise
        finally:
            self.runtime.preview_sink = None
        if errors:
            raise errors[0]
        return output

    def stream(self, request):
        try:
            yield from self.runtime.stream(request)
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._report(exc)
            raise
        finally:
            self.last_reports = [getattr(self.runtime, "last_report", None)]

    def close(self):
        self.closed = True
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        groups.shutdown()
