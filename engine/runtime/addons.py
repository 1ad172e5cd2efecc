"""One rank's add-on models: ControlNets and LoRA adapters, loaded when a request first
names them and made patch-parallel like the denoiser.

Every rank handles the same requests in the same order, so every rank loads the same
add-ons at the same point (loading is collective: the weights are compared across ranks).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from comms.collectives import check_same_weights
from engine.models.controlnets import load_controlnet
from engine.models.loading import inference_mode
from parallel.patch.context import PatchContext
from parallel.patch.controlnet import parallelize_controlnet


class AddOns:
    def __init__(self, pipe, topo, stats, denoiser_ctx: PatchContext, dtype: torch.dtype | None):
        self.pipe, self.topo, self.stats, self.dtype = pipe, topo, stats, dtype
        self.denoiser_ctx = denoiser_ctx
        self.controlnets: dict[tuple, tuple] = {}  # (spec, occurrence) -> (ControlNetModel, its PatchContext)
        self.adapters: dict[str, float] = {}  # loaded LoRA adapters -> default scale
        self.ip_adapter: tuple | None = None  # the loaded IP-Adapter, as the request named it
        self._multi: dict[tuple, object] = {}  # specs -> MultiControlNetModel
        self.pipelines: dict = {}  # workflow pipelines built from the base pipeline (engine.workflows)

    # -- ControlNets -------------------------------------------------------------
    @staticmethod
    def _keys(specs: tuple[str, ...]) -> list[tuple[str, int]]:
        """(spec, occurrence): a ControlNet named twice in one request is two instances, each
        called once per step (its context counts steps)."""
        return [(spec, specs[:i].count(spec)) for i, spec in enumerate(specs)]

    def release_controlnets(self) -> None:
        """Drop every loaded ControlNet (their hooks and contexts go with them)."""
        import gc

        self.controlnets.clear()
        self._multi.clear()
        self.pipelines.clear()  # workflow pipelines hold their ControlNet
        gc.collect()
        if self.topo.device.type == "cuda":
            torch.cuda.empty_cache()

    def controlnet_for(self, specs: tuple[str, ...]):
        """None, the ControlNetModel or a MultiControlNetModel for `specs` (loaded once)."""
        if not specs:
            return None
        keys = self._keys(specs)
        for key in keys:
            if key not in self.controlnets:
                self._load_controlnet(key)
        if len(keys) == 1:
            return self.controlnets[keys[0]][0]
        if specs not in self._multi:
            from diffusers import MultiControlNetModel

            self._multi[specs] = MultiControlNetModel([self.controlnets[k][0] for k in keys])
        return self._multi[specs]

    def _load_controlnet(self, key: tuple[str, int]) -> None:
        spec = key[0]
        dtype = self.dtype or next(self.pipe.unet.parameters()).dtype
        controlnet = load_controlnet(spec, self.topo.device, dtype)
        if self.topo.distributed:
            check_same_weights(f"controlnet {spec}", list(controlnet.parameters()))
        # A context of its own: the ControlNet runs before the UNet in every step, with its
        # own step count and stale buffers (see parallel.patch.controlnet).
        ctx = PatchContext(self.topo, self.stats, role=f"controlnet{len(self.controlnets)}")
        ctx.attention_kernel = self.denoiser_ctx.attention_kernel
        parallelize_controlnet(controlnet, ctx)
        self.controlnets[key] = (controlnet, ctx)

    def contexts(self, specs: tuple[str, ...]) -> list[PatchContext]:
        return [self.controlnets[k][1] for k in self._keys(specs)]

    def _load_lora(self, name: str, source) -> None:
        try:
            self.pipe.load_lora_weights(source, adapter_name=name)
        except BaseException:
            try:  # a load that failed halfway must not block the name for the next attempt
                self.pipe.delete_adapters(name)
            except Exception:
                pass
            self.denoiser_ctx.cover_new_layers()
            raise

    # -- IP-Adapter --------------------------------------------------------------
    @contextmanager
    def _processors_rebuilt(self):
        """Around diffusers' IP-Adapter (un)loaders, which rebuild every attention processor
        from its class with no arguments: the originals go back first, and self-attention is
        made patch-aware again afterwards (new convs swapped too)."""
        from parallel.patch.install import unwrap_processors

        unwrap_processors(self.pipe.unet)
        try:
            yield
        finally:
            self.denoiser_ctx.cover_new_layers()
            inference_mode(self.pipe)

    def _load_ip_adapter(self, source, subfolder, weight_name, scale: float) -> None:
        from engine.models.ip_adapters import load_ip_adapter

        with self._processors_rebuilt():
            load_ip_adapter(self.pipe, source, subfolder, weight_name)
        self.pipe.set_ip_adapter_scale(scale)
        self.ip_adapter = (source, subfolder, weight_name, scale)
        self.pipelines.clear()  # workflow pipelines were built before the image encoder existed

    def _unload_ip_adapter(self) -> None:
        with self._processors_rebuilt():
            self.pipe.unload_ip_adapter()  # sets default processors on every layer
        self.ip_adapter = None
        self.pipelines.clear()

    # -- LoRA adapters -----------------------------------------------------------
    def apply_adapters(self, request) -> None:
        """Make this rank hold the adapters the request lists (load what is missing, delete
        what is not listed: idempotent, so a rank catches up after a failed request or a
        restart), then activate the request's adapters."""
        wanted = {name: (source, weight) for name, source, weight in request.loras}
        for name in [n for n in self.adapters if n not in wanted]:
            self.pipe.delete_adapters(name)
            del self.adapters[name]
        added = False
        for name, (source, weight) in wanted.items():
            if name not in self.adapters:
                if source is None:
                    raise RuntimeError(f"adapter {name!r} is missing on rank {self.topo.rank} and its source was not sent")
                self._load_lora(name, source)
                added = True
            self.adapters[name] = weight
        if added:
            # peft adds its own layers (a 3x3 LoRA conv is a plain Conv2d that would zero-pad
            # at band edges): the install covers them too. They arrive in training mode.
            self.denoiser_ctx.cover_new_layers()
            inference_mode(self.pipe)
        if request.ip_adapter != self.ip_adapter:
            if self.ip_adapter is not None:
                self._unload_ip_adapter()
            if request.ip_adapter is not None:
                self._load_ip_adapter(*request.ip_adapter)
        if not self.adapters:
            return
        active = request.adapters if request.adapters is not None else tuple(self.adapters.items())
        if active:
            self.pipe.set_adapters([name for name, _ in active], adapter_weights=[w for _, w in active])
            self.pipe.enable_lora()
        else:
            self.pipe.disable_lora()
