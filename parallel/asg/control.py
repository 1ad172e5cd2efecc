"""ControlNet under asg: the ControlNet runs per tile, and on the branch's global view.

A ControlNet's residuals belong to the latent window it saw, and running it on the whole
high-resolution latent would attend over every position at once, which is what tiles avoid.
So during an asg request the pipeline's ControlNet call is deferred: it returns a
`DeferredControl` holding the call, and the tiled denoiser runs it with each tile's window
(the latent window, and the same window of the conditioning image at pixel scale) and with
the branch's view (the subsampled latent, and the conditioning image resized to native
pixels). One ControlNet or several (diffusers' MultiControlNetModel): whatever the pipeline
calls is what runs.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F


class DeferredControl:
    """One ControlNet call of the pipeline, run later on a window or on the view."""

    def __init__(self, forward, bound: inspect.BoundArguments):
        self.forward = forward
        self.arguments = dict(bound.arguments)
        for name, parameter in bound.signature.parameters.items():  # a **kwargs parameter: its own names
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                self.arguments.update(self.arguments.pop(name, {}))
        if self.arguments.get("guess_mode"):
            raise NotImplementedError("ControlNet guess_mode does not run under asg (it feeds the conditional half only)")
        # inpainting UNets take [latents, mask, masked image]: the ControlNet the latents, its first channels
        self.channels = self.arguments["sample"].shape[1]
        self.height = self.arguments["sample"].shape[-2]  # latent rows of the whole request

    def _conditions(self, cut):
        cond = self.arguments["controlnet_cond"]
        return [cut(c) for c in cond] if isinstance(cond, (list, tuple)) else cut(cond)

    def _run(self, sample: torch.Tensor, cond) -> dict:
        down, mid = self.forward(**{**self.arguments, "sample": sample[:, : self.channels].contiguous(),
                                    "controlnet_cond": cond, "return_dict": False})
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def on_window(self, sample: torch.Tensor, ys: slice, xs: slice) -> dict:
        """The UNet's residual arguments for a tile: `sample` is the tile's latent window."""
        def cut(cond):
            scale = cond.shape[-2] // self.height  # pixels per latent row (the VAE factor)
            return cond[..., ys.start * scale : ys.stop * scale, xs.start * scale : xs.stop * scale].contiguous()

        return self._run(sample, self._conditions(cut))

    def on_view(self, view: torch.Tensor) -> dict:
        """The UNet's residual arguments for the branch: `view` is the global view at native
        size; the conditioning image is resized (antialiased) to the same field of view."""
        def resize(cond):
            scale = cond.shape[-2] // self.height
            size = (view.shape[-2] * scale, view.shape[-1] * scale)
            return F.interpolate(cond.float(), size=size, mode="bilinear", antialias=True,
                                 align_corners=False).to(cond.dtype)

        return self._run(view, self._conditions(resize))


def deferred(kwargs: dict) -> DeferredControl | None:
    """The deferred ControlNet call among a denoiser call's arguments, if any."""
    control = kwargs.get("down_block_additional_residuals")
    return control if isinstance(control, DeferredControl) else None


def without_control(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in ("down_block_additional_residuals", "mid_block_additional_residual")}


@contextmanager
def instance_forward(module, forward):
    """`module.forward` is `forward` while active; then whatever the instance had before
    comes back (e.g. the CompiledForward of parallel.patch.compiled), or the class's."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


@contextmanager
def controlnet_deferred(controlnet):
    """While active, calling `controlnet` returns (DeferredControl, None) instead of residuals;
    the pipeline hands both to the denoiser, whose asg wrapper runs the call per tile."""
    if controlnet is None:
        yield
        return
    original = controlnet.forward
    signature = inspect.signature(original)

    def defer(*args, **kwargs):
        return DeferredControl(original, signature.bind(*args, **kwargs)), None

    with instance_forward(controlnet, defer):
        yield
