"""Diffusers pipeline -> original LDM / Stability "single-file" checkpoint.

The inverse of diffusers' single-file conversion (`from_single_file`): the engine's
single-file loading is tested against files this writes (the tiny presets have no published
.safetensors), and users can export a diffusers pipeline to one file for tools that only read
the original layout.

Layouts written (tensors are the pipeline's own, only renamed, reshaped or stacked):
- UNet: `model.diffusion_model.*` (input_blocks / middle_block / output_blocks, indices from
  the UNet config); VAE: `first_stage_model.*` (encoder.down.i / decoder.up.i / mid.attn_1).
- SD 1.x: CLIP at `cond_stage_model.transformer.text_model.*` (transformers' layout).
- SDXL base: CLIP-L at `conditioner.embedders.0.transformer.text_model.*`, OpenCLIP bigG at
  `conditioner.embedders.1.model.*` in open_clip's layout (stacked q/k/v, resblocks).
- SDXL refiner (no first text encoder): OpenCLIP at `conditioner.embedders.0.model.*`.

Only the pipeline's weights are written: no EMA copy, no scheduler buffers, no configs, so
loading a file of a non-published shape needs `config=` (a diffusers directory) as well.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

SD_PIPELINES = ("StableDiffusionPipeline",)
XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")

# Block kinds whose LDM layout is written here (others have other module names in LDM).
UNET_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UNET_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
UNET_MID_BLOCK = "UNetMidBlock2DCrossAttn"

# Renames of a block's first-level children, diffusers -> LDM.
UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# First key components of a flattened CLIPTextModel (transformers >= 5.6): the text model's own.
CLIP_TEXT_MODEL_PARTS = ("embeddings", "encoder", "final_layer_norm")

Modules = dict[str, tuple[str, dict[str, str]]]  # diffusers module -> (LDM module, child renames)


def _ldm_key(key: str, modules: Modules) -> str:
    """`key` under the longest diffusers module of `modules` that holds it, renamed."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        found = modules.get(".".join(parts[:n]))
        if found is None:
            continue
        ldm_module, renames = found
        rest = ".".join(parts[n:])
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        return f"{ldm_module}.{rest}"
    raise ValueError(f"{key}: no LDM name for this weight (a module the LDM layout does not have)")


def _renamed(state_dict: dict, modules: Modules, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        ldm_key = prefix + _ldm_key(key, modules)
        if ldm_key in out:
            raise ValueError(f"{key}: maps to {ldm_key}, which another weight already took")
        out[ldm_key] = tensor
    return out


def _check_blocks(kinds, allowed, what: str) -> None:
    for kind in kinds:
        if kind not in allowed:
            raise ValueError(f"UNet {what} block {kind!r}: no LDM layout here (only {', '.join(allowed)})")


def _unet_modules(config) -> Modules:
    """Where every UNet module sits in LDM's flat input / middle / output block lists."""
    if not isinstance(config.layers_per_block, int):
        raise ValueError(f"UNet layers_per_block {config.layers_per_block!r}: LDM's layout has one count for all")
    _check_blocks(config.down_block_types, UNET_DOWN_BLOCKS, "down")
    _check_blocks(config.up_block_types, UNET_UP_BLOCKS, "up")
    _check_blocks([config.mid_block_type], [UNET_MID_BLOCK], "mid")
    modules: Modules = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET_PARTS),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET_PARTS),
    }
    return {**modules, **_label_emb_modules(config), **_down_modules(config), **_up_modules(config)}


def _label_emb_modules(config) -> Modules:
    """LDM's `label_emb` MLP holds whichever extra embedding diffusers' conversion reads there."""
    if config.addition_embed_type == "text_time":
        extra = "add_embedding"  # SDXL's pooled text + size / crop conditioning
    elif config.class_embed_type in ("timestep", "projection"):
        extra = "class_embedding"
    else:
        return {}  # any other extra embedding's weights find no LDM name, and are refused
    return {f"{extra}.linear_1": ("label_emb.0.0", {}), f"{extra}.linear_2": ("label_emb.0.2", {})}


def _down_modules(config) -> Modules:
    """A down level is `layers_per_block` (resnet, attention) entries of input_blocks, then
    its downsampler as an entry of its own (none after the last level); entry 0 is conv_in."""
    modules: Modules = {}
    last = len(config.down_block_types) - 1
    entry = 1
    for level, kind in enumerate(config.down_block_types):
        for i in range(config.layers_per_block):
            modules[f"down_blocks.{level}.resnets.{i}"] = (f"input_blocks.{entry}.0", UNET_RESNET_PARTS)
            if kind.startswith("CrossAttn"):
                modules[f"down_blocks.{level}.attentions.{i}"] = (f"input_blocks.{entry}.1", {})
            entry += 1
        if level < last:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{entry}.0.op", {})
            entry += 1
    return modules


def _up_modules(config) -> Modules:
    """An up level is `layers_per_block + 1` entries of output_blocks; its upsampler sits in
    the last one, after the resnet (and the attention, where the level has one)."""
    modules: Modules = {}
    last = len(config.up_block_types) - 1
    entry = 0
    for level, kind in enumerate(config.up_block_types):
        attention = kind.startswith("CrossAttn")
        for i in range(config.layers_per_block + 1):
            modules[f"up_blocks.{level}.resnets.{i}"] = (f"output_blocks.{entry}.0", UNET_RESNET_PARTS)
            if attention:
                modules[f"up_blocks.{level}.attentions.{i}"] = (f"output_blocks.{entry}.1", {})
            entry += 1
        if level < last:
            upsampler = f"output_blocks.{entry - 1}.{2 if attention else 1}.conv"
            modules[f"up_blocks.{level}.upsamplers.0.conv"] = (upsampler, {})
    return modules


def _vae_modules(config) -> Modules:
    """LDM numbers the decoder's levels from the bottom (up.0 is the last to run): diffusers'
    up_blocks.i is up.{levels - 1 - i}. Every name a level may have is listed; weights a
    level lacks (the last downsampler) are simply never looked up."""
    kinds = set(config.down_block_types) | set(config.up_block_types)
    if not kinds <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise ValueError(f"VAE blocks {sorted(kinds)}: no LDM layout here")
    modules: Modules = {name: (name, {}) for name in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            modules[f"{side}.{name}"] = (f"{side}.{name}", {})
        modules[f"{side}.conv_norm_out"] = (f"{side}.norm_out", {})
        modules[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", VAE_RESNET_PARTS)
        modules[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", VAE_RESNET_PARTS)
        modules[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", VAE_ATTENTION_PARTS)
    levels = len(config.block_out_channels)
    for level in range(levels):
        for i in range(config.layers_per_block):
            modules[f"encoder.down_blocks.{level}.resnets.{i}"] = (f"encoder.down.{level}.block.{i}", VAE_RESNET_PARTS)
        modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", {})
        ldm_level = levels - 1 - level
        for i in range(config.layers_per_block + 1):
            modules[f"decoder.up_blocks.{level}.resnets.{i}"] = (f"decoder.up.{ldm_level}.block.{i}", VAE_RESNET_PARTS)
        modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{ldm_level}.upsample.conv", {})
    return modules


def unet_ldm_state_dict(unet) -> dict[str, torch.Tensor]:
    return _renamed(unet.state_dict(), _unet_modules(unet.config), UNET_PREFIX)


def vae_ldm_state_dict(vae) -> dict[str, torch.Tensor]:
    out = _renamed(vae.state_dict(), _vae_modules(vae.config), VAE_PREFIX)
    # LDM's mid-block attention projects with 1x1 convolutions, diffusers' with linear layers.
    for key, tensor in out.items():
        if ".mid.attn_1." in key and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def clip_ldm_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel in transformers' layout under `prefix` + `text_model.`: keys of a
    flattened CLIPTextModel (no `text_model.` wrapper) get it back, as LDM files have it."""
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.split(".")[0] in CLIP_TEXT_MODEL_PARTS:
            key = "text_model." + key
        elif not key.startswith("text_model."):
            raise ValueError(f"text encoder weight {key}: not part of a CLIP text model (LDM files hold no projection)")
        out[prefix + key] = tensor
    return out


def open_clip_ldm_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in open_clip's layout under `prefix`."""
    weights = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    projection = weights.pop("text_projection.weight", None)
    if projection is None:
        raise ValueError("OpenCLIP text encoder without text_projection: needs a CLIPTextModelWithProjection")
    # open_clip computes x @ text_projection, a Linear x @ weight.T: the file holds weight.T.
    out = {prefix + "text_projection": projection.T.contiguous()}
    for name, ldm_name in OPEN_CLIP_TOP.items():
        out[prefix + ldm_name] = weights.pop(name)
    for layer in range(text_encoder.config.num_hidden_layers):
        src = f"encoder.layers.{layer}."
        dst = f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            # open_clip's nn.MultiheadAttention keeps q, k and v as one stacked projection.
            qkv = [weights.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for name, ldm_name in OPEN_CLIP_LAYER_PARTS.items():
                out[f"{dst}{ldm_name}.{kind}"] = weights.pop(f"{src}{name}.{kind}")
    if weights:
        raise ValueError(f"OpenCLIP text encoder weights with no open_clip name: {sorted(weights)}")
    return out


def _text_encoders(pipe) -> dict[str, torch.Tensor]:
    name = type(pipe).__name__
    if name in SD_PIPELINES:
        return clip_ldm_state_dict(pipe.text_encoder, SD_CLIP_PREFIX)
    if name not in XL_PIPELINES:
        raise ValueError(f"{name}: no LDM single-file layout here (only {', '.join(SD_PIPELINES + XL_PIPELINES)})")
    if pipe.text_encoder_2 is None:
        raise ValueError(f"{name} without text_encoder_2: SDXL files always hold the OpenCLIP encoder")
    if pipe.text_encoder is None:
        # The refiner: OpenCLIP alone, as the first embedder (diffusers detects it there).
        return open_clip_ldm_state_dict(pipe.text_encoder_2, REFINER_OPEN_CLIP_PREFIX)
    return {
        **clip_ldm_state_dict(pipe.text_encoder, XL_CLIP_PREFIX),
        **open_clip_ldm_state_dict(pipe.text_encoder_2, XL_OPEN_CLIP_PREFIX),
    }


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under LDM single-file names. Tensors are the pipeline's own
    where no reshaping is needed (no copy): detach or clone before changing them."""
    text = _text_encoders(pipe)  # first: it refuses unsupported pipelines
    return {**unet_ldm_state_dict(pipe.unet), **vae_ldm_state_dict(pipe.vae), **text}


def save_single_file(pipe, path: str) -> str:
    """Write `ldm_state_dict(pipe)` to `path`, a .safetensors file; returns `path`."""
    from safetensors.torch import save_file

    # diffusers picks the reader by extension: anything else would go to torch.load.
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: a single-file checkpoint written here must end in .safetensors")
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in ldm_state_dict(pipe).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return path
