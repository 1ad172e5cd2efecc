"""IP-Adapters: a built-in tiny one for tests, or diffusers' own files.

`tiny-ip-adapter` fits the SD 1.x presets (cross-attention width 32): a seeded random
IP-Adapter state dict (image projection to 4 tokens, to_k_ip / to_v_ip per cross-attention
layer) and a tiny CLIP vision encoder with its image processor, built alike on every rank.
"""

from __future__ import annotations

import torch

IP_ADAPTER_PRESETS = ("tiny-ip-adapter",)
_SEED = 2468
_EMBED = 16  # the vision encoder's projection width


def _tiny_image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=_EMBED)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def _tiny_state_dict(unet) -> dict:
    """IP-Adapter weights in diffusers' layout for `unet` (keys 1, 3, 5 ... per cross-attention)."""
    cross = unet.config.cross_attention_dim
    widths = unet.config.block_out_channels
    image_proj = {"proj.weight": torch.randn(4 * cross, _EMBED) * 0.2, "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        level = int(name.split(".")[1]) if name.startswith(("down_blocks", "up_blocks")) else None
        hidden = (widths[-1] if level is None else widths[level] if name.startswith("down_blocks")
                  else list(reversed(widths))[level])
        ip_adapter[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.2
        ip_adapter[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.2
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def load_ip_adapter(pipe, source, subfolder: str | None, weight_name: str | None) -> None:
    """Load an IP-Adapter into `pipe` (a preset, or what diffusers' load_ip_adapter reads)."""
    if source in IP_ADAPTER_PRESETS:
        torch.manual_seed(_SEED)
        encoder, processor = _tiny_image_encoder()
        state = _tiny_state_dict(pipe.unet)
        pipe.register_modules(image_encoder=encoder.to(pipe.device, pipe.unet.dtype), feature_extractor=processor)
        pipe.load_ip_adapter(state, subfolder=None, weight_name=None, image_encoder_folder=None)
    else:
        pipe.load_ip_adapter(source, subfolder=subfolder, weight_name=weight_name)
