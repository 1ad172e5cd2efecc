"""PatchContext: the per-rank state every patch-aware layer consults.

Layers are swapped into the model once; what changes per request (band plan, CFG split,
strategy, current step) lives here, so one set of worker processes serves requests of
any size and strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comms import CommStats, StaleExchange, Topology
from comms.isolated import exchange_factory
from parallel.patch.bands import BandPlan
from parallel.config import ParallelConfig
from parallel.registry import Strategy, strategy_of


@dataclass
class RequestLayout:
    """How one request is laid out over the world."""

    config: ParallelConfig
    strategy: Strategy
    plan: BandPlan  # bands inside this rank's patch group
    cfg_split: bool
    group_index: int  # which CFG half this rank serves (0 when not split)
    band_index: int  # this rank's band inside its patch group
    patch_exchange: StaleExchange | None  # None when the group has one member


class PatchContext:
    def __init__(self, topo: Topology, stats: CommStats, make_exchange=None, role: str = "denoise"):
        # make_exchange(group, ranks, rank, stats, label): real exchanges by default; an
        # isolated rank passes comms.isolated's (the layers cannot tell the difference).
        # Labels name an exchange across runs: "<role>.world-2", "<role>.patch-0-1".
        self._make_exchange = make_exchange or exchange_factory()
        self.role = role
        self.topo = topo
        self.stats = stats
        self.enabled = False  # False: every swapped layer behaves exactly like the original
        self.layout: RequestLayout | None = None
        self.step = -1
        self._exchanges: dict = {}
        self.text_tokens = 0  # text tokens in front of the image tokens (Flux single-stream blocks)
        self._whole: list[tuple[torch.Tensor, torch.Tensor]] = []  # (band, full) of the denoiser's inputs
        self._weights: dict = {}
        self.step_cache: dict = {}
        self.hooks: list = []  # handles of the split/gather hooks installed for this context
        self.attention_kernel = None  # parallel.patch.kernels: None is SDPA
        self.guards: list = []  # callables raising ConfigError when an installed model was changed since
        self.cover_new_layers = lambda: None  # swaps patch-aware layers onto modules added since the install
        # Per-step constants: layers read these, never `step` (under torch.compile a value
        # read is guarded on, and a guard on the step number would recompile every step).
        self._sync = True
        self.seeding_pcpp = False  # the last warm-up step of pcpp primes its adjacent views
        self.compile_requested = False  # ParallelConfig.compile of the current request
        self.compile_step = False  # this step runs the compiled denoiser (parallel.patch.compiled)
        self.rebind(topo)

    def rebind(self, topo: Topology) -> None:
        """Serve another rank position from now on (isolated measurements move one model
        through every rank of every world size): the exchanges of the old one are dropped."""
        self.topo = topo
        self._exchanges = {}
        # the prediction gather's own communicator: see Topology.output_group
        self.world_exchange = (
            self._make_exchange(topo.output_group(), range(topo.world_size), topo.rank, self.stats,
                                f"{self.role}.world-{topo.world_size}")
            if topo.distributed else None
        )

    # -- per request -------------------------------------------------------------
    def begin_request(self, config: ParallelConfig, height: int, width: int, align: int, cfg_split: bool) -> None:
        group, ranks = self.topo.patch_group(cfg_split)
        plan = BandPlan.split(height, width, len(ranks), align)
        exchange = None
        if len(ranks) > 1:
            key = tuple(ranks)
            if key not in self._exchanges:
                label = f"{self.role}.patch-" + "-".join(map(str, ranks))
                self._exchanges[key] = self._make_exchange(group, ranks, self.topo.rank, self.stats, label)
            exchange = self._exchanges[key]
            exchange.reset()
            exchange.configure(config.bucket_mb)
        group_index = self.topo.rank // len(ranks) if cfg_split else 0
        self.layout = RequestLayout(config, strategy_of(config), plan, cfg_split, group_index,
                                    ranks.index(self.topo.rank), exchange)
        self._weights = {}
        self.step = -1
        self.enabled = True

    def remove_hooks(self) -> None:
        """Remove the split/gather hooks (the swapped layers then act as the originals for
        good: without hooks no request ever enables them)."""
        self.enabled = False
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def check_installed(self) -> None:
        """Refuse, naming the module, a model changed after the parallel layers were installed
        (a plain conv, GroupNorm or attention processor would silently break the split)."""
        for guard in self.guards:
            guard()

    def use_compile(self, on: bool) -> None:
        """Run the compiled denoiser (parallel.patch.compiled) in this request's repeating steps;
        without a row split, in every step."""
        self.compile_requested = self.compile_step = on

    def end_request(self) -> None:
        if self.layout is not None and self.layout.patch_exchange is not None:
            self.layout.patch_exchange.reset()  # wait for what is still in flight
            self.layout.patch_exchange.end_request()
        if self.world_exchange is not None:
            self.world_exchange.end_request()
        self.enabled = False

    # -- per step ----------------------------------------------------------------
    def begin_step(self) -> None:
        self.step += 1
        self.stats.step = self.step
        self.step_cache = {}  # what layers derive once per step and share (GroupNorm blocks)
        cfg, strategy = self.layout.config, self.layout.strategy
        self._sync = strategy.sync_at(self.step, cfg.warmup_steps)
        self.seeding_pcpp = strategy.adjacent_kv and self.step == cfg.warmup_steps - 1
        # Steps before the steady state (warm-up, the first stale step that records the
        # buckets, the first bucketed one that still reads its posts) run eagerly: each runs
        # once per request, and compiling its variant would cost more than it saves.
        self.compile_step = self.compile_requested and self.step >= strategy.steady_from(cfg.warmup_steps, compiled=True)

    def end_step(self) -> None:
        self._whole = []
        if self.layout.patch_exchange is not None:
            self.layout.patch_exchange.flush()

    # -- what layers ask ---------------------------------------------------------
    @property
    def splits_rows(self) -> bool:
        return self.enabled and self.layout is not None and self.layout.patch_exchange is not None

    @property
    def sync(self) -> bool:
        """Whether this step's exchanges are fresh and blocking."""
        return self._sync

    @property
    def pcpp(self) -> bool:
        """Partially conditioned attention (after warm-up: own band + adjacent boundary rows)."""
        return self.layout.strategy.adjacent_kv

    @property
    def gn_sync(self) -> bool:
        return self.sync or self.layout.config.gn_mode == "sync"

    def hold_whole(self, band: torch.Tensor, full: torch.Tensor) -> None:
        """This step's denoiser input `band` is the row band of `full`, which this rank holds
        whole: layers reading `band` can take neighbour rows from `full` fresh, for free."""
        self._whole.append((band, full))

    def whole_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """The full tensor `x` is this rank's band of, when this rank holds it whole."""
        for band, full in self._whole:
            if x is band:
                return full
        return None

    def band_weights(self, device) -> torch.Tensor:
        """Each band's share of the pixels, as a float32 tensor on `device` (cached)."""
        key = str(device)
        if key not in self._weights:
            self._weights[key] = torch.tensor(self.layout.plan.weights(), dtype=torch.float32, device=device)
        return self._weights[key]

    @property
    def exchange(self) -> StaleExchange:
        return self.layout.patch_exchange

    @property
    def plan(self) -> BandPlan:
        return self.layout.plan

    @property
    def index(self) -> int:
        return self.layout.band_index

    @property
    def members(self) -> int:
        return self.layout.plan.members


class SwappedLayer:
    """Mixin of the patch-aware layers, whose class is swapped onto an existing module in
    place (weights, names and state_dict keys stay). Without an active row split the layer
    is exactly the original."""

    _tessera_ctx: PatchContext | None = None
    _tessera_name = ""

    def _row_split(self) -> PatchContext | None:
        ctx = self._tessera_ctx
        return ctx if ctx is not None and ctx.splits_rows else None
