"""Ray launcher: one Ray actor per rank, in a placement group, driven from the caller's process.

- Connects to a Ray cluster (`address`, or RAY_ADDRESS), or starts a private one-node
  cluster on this machine when there is none.
- Reserves one bundle per rank (a GPU each where the cluster has enough GPUs, else a CPU)
  and orders ranks so that ranks on the same node are contiguous: neighbouring bands, the
  ones that exchange every step, then talk over local links.
- Rank 0's actor publishes its node IP and a free port; every actor joins
  `torch.distributed` there (never a hard-coded localhost) and uses its own local device.
- Liveness: the driver waits on every rank's call with `ray.wait`; a rank that raises or an
  actor that dies fails the request within seconds with the rank and the cause, and the
  whole group is killed (peers may sit in a collective that will never complete).
- Streams (tpp video): the decoding rank puts frames into a Ray queue the driver reads; a
  small control actor carries the caller's side back to rank 0 (chunks consumed, for
  backpressure, and stop, when the caller closes the stream early).
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict

from launch.worker import AGREE_S, CHUNKS_AHEAD_SLACK, RankFailedError, RequestFailedError, configure_threads
from parallel.config import ConfigError

START_TIMEOUT_S = 600.0
PLACEMENT_TIMEOUT_S = 60.0
POLL_S = 0.2
DEATH_GRACE_S = 3.0  # how long a peer's error waits for Ray to report a dead actor
STREAM_POLL_S = 0.005  # rank 0's backpressure poll


def import_ray():
    try:
        import ray
    except ImportError as exc:  # ray is a dependency, but a trimmed install may lack it
        raise ConfigError("launcher='ray' needs the ray package: pip install 'ray>=2.9'") from exc
    return ray


def _private_cluster_on_loopback() -> None:
    """A private one-node cluster binds 127.0.0.1, not the machine's network address. Ray
    reads this switch when it is imported (the driver) and when its daemons start."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


class RankActor:
    """The body of one rank inside a Ray actor (wrapped with `ray.remote` at launch)."""

    def where(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def host_store(self, host: str, timeout_s: float) -> int:
        """Rank 0: serve the rendezvous store on this node's own address (never the
        wildcard); returns its port."""
        from comms.groups import listening_store

        self._store = listening_store(host, timeout_s)
        return self._store.port

    def pid(self) -> int:
        return os.getpid()

    def start(self, rank, world, local_rank, local_world, master, model, parallel, device, dtype, setup=None):
        os.environ.update(
            MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank), WORLD_SIZE=str(world),
            LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_world),
        )
        configure_threads(parallel.threads_per_rank, local_world)
        from engine.quiet import quiet_libraries

        quiet_libraries(rank)
        from comms.groups import init_distributed
        from engine.runtime.image import make_runtime

        self.rank = rank
        from comms.groups import client_store, ray_local_gpu

        store = self._store if rank == 0 else client_store(master[0], master[1], parallel.comm_timeout_s)
        # The GPU Ray assigned to this actor (ray.get_gpu_ids()), not one derived from ranks.
        topo = init_distributed(rank, world, ray_local_gpu(local_rank), device, parallel.comm_timeout_s, store=store)
        self.runtime = make_runtime(model, topo, dtype, setup)
        return self.runtime.info

    def run(self, request, previews=None):
        """("ok", rank 0's output) or ("request_error", summary, traceback, point): whether a
        request that failed here failed alone (alike on every rank) is the launcher's call.
        `previews`: a Ray queue rank 0 puts (step, preview) into for the caller."""
        import traceback

        from launch.worker import summarize

        self.runtime.preview_sink = (lambda step, preview: previews.put((step, preview))) if previews is not None else None
        try:
            output = self.runtime.run(request)
        except Exception as exc:
            return ("request_error", summarize(exc), traceback.format_exc(), (summarize(exc), self.runtime.topo.barriers))
        finally:
            self.runtime.preview_sink = None
        return ("ok", output if self.rank == 0 else None)

    def stream(self, request, frames, control):
        """This rank's part of a stream; the decoding rank puts (chunk, frames, seconds) into
        the `frames` queue. Returns this rank's report."""
        import ray

        ahead = request.world_size + CHUNKS_AHEAD_SLACK

        def should_stop():
            return ray.get(control.state.remote())[1]

        def may_start(chunk):  # backpressure: wait while the caller is `ahead` chunks behind
            while True:
                consumed, stop = ray.get(control.state.remote())
                if stop or chunk - consumed < ahead:
                    return
                time.sleep(STREAM_POLL_S)

        for item in self.runtime.stream(request, should_stop=should_stop, may_start=may_start):
            frames.put(item)
        return self.runtime.last_report

    def stop(self) -> None:
        from comms.groups import shutdown

        shutdown()


class StreamControl:
    """The caller's side of one stream, for rank 0 to read: chunks consumed and stop."""

    def __init__(self):
        self.consumed, self.stop = 0, False

    def took(self, chunks: int) -> None:
        self.consumed = chunks

    def halt(self) -> None:
        self.stop = True

    def state(self) -> tuple[int, bool]:
        return self.consumed, self.stop


def _died(ray, exc) -> bool:
    return isinstance(exc, ray.exceptions.ActorDiedError)


def _summary(exc: BaseException) -> tuple[str, str]:
    """(one-line cause, details) of an error raised inside an actor and re-raised by Ray."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return (f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__), str(exc)


class RayLauncher:
    def __init__(self, model, parallel, world_size: int, device=None, dtype=None, address=None, setup=None):
        ray = self._ray = import_ray()
        started = time.perf_counter()
        self.world_size = world_size
        self.closed = False
        self.last_reports: list = []  # every rank's report of the last stream
        self._owns_ray = False
        self._actors: list = []
        self._pg = None
        self._private = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:  # a private cluster on this machine: one logical CPU per rank at least
                _private_cluster_on_loopback()
                ray.init(num_cpus=max(os.cpu_count() or 1, world_size), include_dashboard=False,
                         log_to_driver=False)
                self._private = True
            self._owns_ray = True
        try:
            self._start(model, parallel, device, dtype, setup)
        except BaseException:
            self.close(graceful=False)
            raise
        self.startup_s = time.perf_counter() - started
        nodes = len({node for node, _ in self.nodes})
        print(f"tessera: {world_size} Ray rank actors ready on {nodes} node(s) in {self.startup_s:.1f} s "
              f"(rank 0 at {self.master[0]}:{self.master[1]})", file=sys.stderr, flush=True)

    # -- start-up -----------------------------------------------------------------------
    def _bundles(self, device) -> tuple[list[dict], dict]:
        resources = self._ray.cluster_resources()
        want_gpu = device is None or str(device).startswith("cuda")
        use_gpu = want_gpu and resources.get("GPU", 0) >= self.world_size
        if device is not None and str(device).startswith("cuda") and not use_gpu:
            raise ConfigError(f"device {device!r} asked for, but the Ray cluster has "
                              f"{resources.get('GPU', 0):g} GPUs for {self.world_size} ranks")
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        if resources.get("CPU", 0) < self.world_size:
            raise ConfigError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs; {self.world_size} ranks need "
                              f"one each (start nodes with more --num-cpus, or use fewer ranks)")
        return [dict(bundle) for _ in range(self.world_size)], bundle

    def _start(self, model, parallel, device, dtype, setup=None) -> None:
        ray = self._ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles, bundle = self._bundles(device)
        self._pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RankFailedError(f"Ray could not place {self.world_size} bundles of {bundle} within "
                                  f"{PLACEMENT_TIMEOUT_S:.0f} s (cluster: {ray.cluster_resources()})") from None
        node_of_bundle = placement_group_table(self._pg)["bundles_to_node_id"]
        # Ranks on one node are contiguous, nodes in the order their first bundle appears.
        by_node: OrderedDict[str, list[int]] = OrderedDict()
        for index in sorted(node_of_bundle):
            by_node.setdefault(node_of_bundle[index], []).append(index)
        placement = [(index, local, len(indices)) for indices in by_node.values()
                     for local, index in enumerate(indices)]
        remote = ray.remote(RankActor)
        env = {"TOKENIZERS_PARALLELISM": "false"}
        for var in ("HF_HUB_OFFLINE", "TESSERA_INJECT_FAULT"):
            if var in os.environ:
                env[var] = os.environ[var]
        if self._private:
            from comms.groups import pin_to_loopback

            pin_to_loopback(env)  # one machine: gloo / NCCL never listen beyond loopback
        self._actors = [
            remote.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=0,
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index),
            ).remote()
            for index, _, _ in placement
        ]
        self.nodes = self._gather([a.where.remote() for a in self._actors], "where", START_TIMEOUT_S)
        host = self.nodes[0][1]
        master = (host, self._gather([self._actors[0].host_store.remote(host, parallel.comm_timeout_s)], "host_store", 60)[0])
        starts = [
            actor.start.remote(rank, self.world_size, local, local_world, master, model, parallel, device, dtype, setup)
            for rank, (actor, (_, local, local_world)) in enumerate(zip(self._actors, placement))
        ]
        self.info = self._gather(starts, "start", START_TIMEOUT_S)[0]
        self.master = master

    # -- requests -----------------------------------------------------------------------
    def run(self, request, on_preview=None):
        if self.closed:
            raise RankFailedError("this engine's Ray actors are stopped; call engine.restart() or make a new engine")
        if on_preview is None:
            refs = [actor.run.remote(request) for actor in self._actors]
            return self._gather(refs, "run", None, agree=True)[0][1]
        from ray.util.queue import Empty, Queue

        previews = Queue(actor_options={"num_cpus": 0})  # rank 0 -> this process, while the ranks work
        errors = []

        def deliver():
            while True:
                try:
                    step, preview = previews.get(block=False)
                except Empty:
                    return
                if not errors:
                    try:
                        on_preview(step, preview)
                    except Exception as exc:  # the caller's code: raised once every rank answered
                        errors.append(exc)

        try:
            refs = [actor.run.remote(request, previews if rank == 0 else None) for rank, actor in enumerate(self._actors)]
            results = self._gather(refs, "run", None, agree=True, poll=deliver)
            deliver()  # what rank 0 put before it returned
        finally:
            self._kill_helpers(previews.actor)
        if errors:
            raise errors[0]
        return results[0][1]

    def stream(self, request):
        """Yield (chunk, frames, seconds) as the decoding rank sends them; afterwards
        `last_reports` holds every rank's report. Closing the generator early stops the
        pipeline (rank 0 starts no new chunk, the rest drain) and waits for every rank."""
        if self.closed:
            raise RankFailedError("this engine's Ray actors are stopped; call engine.restart() or make a new engine")
        ray = self._ray
        from ray.util.queue import Empty, Queue

        self.last_reports = []
        frames = Queue(actor_options={"num_cpus": 0})
        control, refs, taken, finished = None, [], 0, False
        try:
            control = ray.remote(StreamControl).options(num_cpus=0).remote()
            refs = [actor.stream.remote(request, frames, control) for actor in self._actors]
            while True:
                try:
                    item = frames.get(timeout=POLL_S)
                except Empty:
                    if self._stream_ended(refs):  # every rank returned: what is queued is all
                        while not frames.empty():
                            yield frames.get()
                            taken += 1
                        finished = True
                        break
                    continue
                yield item
                taken += 1
                control.took.remote(taken)
        finally:
            try:
                if refs and not self.closed:
                    if not finished:
                        control.halt.remote()  # stopped early: rank 0 starts no new chunk, the rest drain
                    self.last_reports = self._gather(refs, "stream", None)
            finally:
                self._kill_helpers(control, frames.actor)

    def _kill_helpers(self, *handles) -> None:
        ray = self._ray
        if not ray.is_initialized():  # a failure shut down the private cluster, helpers and all
            return
        for handle in handles:
            if handle is not None:
                try:
                    ray.kill(handle, no_restart=True)
                except ray.exceptions.RayError:  # already gone with its node
                    pass

    def _stream_ended(self, refs: list) -> bool:
        """Whether every rank's stream call returned; fails fast (naming the rank) when one
        raised or its actor died."""
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            try:
                self._ray.get(ref)
            except self._ray.exceptions.RayError:
                self._gather(refs, "stream", None)  # raises with the root cause
        return len(ready) == len(refs)

    def _gather(self, refs: list, what: str, timeout_s: float | None, agree: bool = False, poll=None) -> list:
        """Every rank's result of one call; the first error or dead actor fails them all.
        `agree`: results are ("ok", ...) or ("request_error", ...) (RankActor.run); a request
        error on every rank at the same point fails the request alone (RequestFailedError, the
        actors stay), anything else fails the group. `poll()` runs between waits (previews)."""
        ray = self._ray
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict = {}
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            if poll is not None:
                poll()
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    others = [r for r in ready if r is not ref] + pending
                    self._fail(*self._root_cause(rank_of[ref], exc, others, rank_of, what))
                if agree and results[rank_of[ref]][0] == "request_error":
                    others = [r for r in ready if r is not ref and rank_of[r] not in results] + pending
                    self._request_failed(rank_of[ref], results, others, rank_of)
            if deadline is not None and time.monotonic() > deadline:
                late = sorted(rank_of[r] for r in pending)
                self._fail(f"ranks {late} did not finish {what!r} within {timeout_s:.0f} s")
        return [results[rank] for rank in range(len(refs))]

    def _request_failed(self, rank: int, results: dict, pending: list, rank_of: dict) -> None:
        """Rank `rank` failed the request: wait a moment for the others. All failed alike at
        the same point: the request failed alone. Otherwise the group is unusable."""
        ray = self._ray
        end = time.monotonic() + AGREE_S
        while pending and time.monotonic() < end:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self._fail(*self._root_cause(rank_of[ref], exc, pending, rank_of, "run"))
        failed = {r: v for r, v in results.items() if v[0] == "request_error"}
        summary, details = failed[rank][1], failed[rank][2]
        if not pending and len(failed) == len(results) and len({v[3] for v in failed.values()}) == 1:
            raise RequestFailedError(f"the request failed on every rank: {summary}", details)
        self._fail(f"rank {rank} failed: {summary}", details)

    def _root_cause(self, rank: int, exc, pending: list, rank_of: dict, what: str) -> tuple[str, str]:
        """The message that names the rank that caused a failure. When an actor dies, its
        peers often raise first (their connection to it closed) before Ray reports the death,
        so give the other ranks a moment and prefer a dead actor over a peer's error."""
        ray = self._ray
        failures = [(rank, exc)]
        end = time.monotonic() + DEATH_GRACE_S
        while pending and time.monotonic() < end and not any(_died(ray, e) for _, e in failures):
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as other:
                    failures.append((rank_of[ref], other))
        rank, exc = next(((r, e) for r, e in failures if _died(ray, e)), failures[0])
        if _died(ray, exc):
            return f"rank {rank} died (its Ray actor is gone) during {what}", str(exc)
        message, details = _summary(exc)
        return f"rank {rank} failed: {message}", details

    def _fail(self, message: str, details: str = ""):
        self.close(graceful=False)
        raise RankFailedError(message, details)

    def actor_pids(self) -> list[int]:
        """Process ids of the rank actors, rank order (for tests and diagnostics)."""
        return self._gather([a.pid.remote() for a in self._actors], "pid", 30)

    def close(self, graceful: bool = True) -> None:
        """Release the actors and the placement group (and a private Ray cluster)."""
        if self.closed:
            return
        self.closed = True
        ray = self._ray
        if graceful and self._actors:
            try:
                ray.get([a.stop.remote() for a in self._actors], timeout=10)
            except Exception:  # noqa: BLE001 - an actor already gone: kill below anyway
                pass
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        if self._owns_ray:
            ray.shutdown()
