"""ControlNets: built-in tiny ones for tests, or any diffusers ControlNetModel directory.

`tiny-controlnet` (for tiny-sd and shapes-sd, whose UNets share its layout) and
`tiny-sdxl-controlnet` (for tiny-sdxl) are built from their base preset's UNet with
seeded weights. A freshly made ControlNet's zero convs output zeros (it would not change
anything, and a test of it could not fail), so theirs are seeded random too.
"""

from __future__ import annotations

import json
import os

import torch

from parallel.errors import ConfigError

CONTROLNET_PRESETS = {"tiny-controlnet": "tiny-sd", "tiny-sdxl-controlnet": "tiny-sdxl"}
_SEED = 4321


def check_controlnet_spec(spec) -> None:
    """Fail before any rank starts on a ControlNet that cannot load."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError("controlnet must be a preset name, a local ControlNetModel directory or a hub id")
    if spec in CONTROLNET_PRESETS:
        return
    if os.path.isdir(spec):
        config = os.path.join(spec, "config.json")
        try:
            with open(config) as f:
                kind = json.load(f).get("_class_name")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"controlnet {spec}: cannot read {config} ({exc})") from None
        if kind != "ControlNetModel":  # union / SD3 / Flux ControlNets are other classes, not patch-parallel here
            raise ConfigError(f"controlnet {spec}: {config} describes a {kind}, not a ControlNetModel")
        return
    from engine.models.loading import check_hub_id

    check_hub_id(spec, "controlnet", f"not a preset ({', '.join(CONTROLNET_PRESETS)}), not a local directory")


def _tiny_controlnet(base: str):
    from diffusers import ControlNetModel

    from engine.models.presets import PRESETS

    unet = PRESETS[base]().unet
    torch.manual_seed(_SEED)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    for name, param in controlnet.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            param.data.normal_(0.0, 0.05)
    return controlnet.eval()


def load_controlnet(spec: str, device: torch.device, dtype: torch.dtype | None):
    if spec in CONTROLNET_PRESETS:
        controlnet = _tiny_controlnet(CONTROLNET_PRESETS[spec])
    else:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(spec, torch_dtype=dtype)
    controlnet = controlnet.to(device)
    if dtype is not None and dtype != controlnet.dtype:
        controlnet = controlnet.to(dtype)
    return controlnet.eval()  # a built preset starts in training mode
