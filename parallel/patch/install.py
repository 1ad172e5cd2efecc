"""Installing the patch-aware layers into a model, and checking that they are still there.

One loop for every model family (UNet, ControlNet, DiT, VAE decoder): k x k convs become
`HaloConv2d` and GroupNorms `PatchGroupNorm` by class swap (weights, names and state_dict
keys stay), self-attention processors are wrapped by a patch-aware one. Swapping again is
harmless and covers modules added since (peft's LoRA layers), which is how adapters loaded
after the install stay exact. `check_patch_aware` is the guard run before each split
request: a module replaced behind the engine's back would silently zero-pad at band edges
or attend to its own band only, so it is refused by name instead.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from parallel.errors import ConfigError
from parallel.patch.conv import HaloConv2d, can_halo
from parallel.patch.groupnorm import PatchGroupNorm

NamedModules = Iterable[tuple[str, nn.Module]]


def _conv_supported(module: nn.Conv2d, stride_one: bool) -> bool:
    return type(module) in (nn.Conv2d, HaloConv2d) and can_halo(module) and (module.stride[0] == 1 or not stride_one)


def check_swappable(named: NamedModules, stride_one: bool = False) -> None:
    """Raise NotImplementedError, naming the module, for a layer whose receptive field
    crosses band boundaries in a way the halo conv does not handle."""
    for name, module in named:
        if isinstance(module, nn.ConvTranspose2d):
            raise NotImplementedError(f"{name}: transposed convs are not band-parallel")
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1 and not _conv_supported(module, stride_one):
            raise NotImplementedError(
                f"{name}: {type(module).__name__}(kernel={module.kernel_size}, padding={module.padding}, "
                f"stride={module.stride}, dilation={module.dilation}, mode={module.padding_mode}) crosses band "
                "boundaries in a way patch parallelism does not handle"
            )


def swap_layers(named: NamedModules, ctx, stride_one: bool = False) -> None:
    """Swap the band-aware convs and GroupNorms into `named` (checked first: nothing changes
    when one layer is unsupported). Layers swapped before are rebound to `ctx`."""
    named = list(named)
    check_swappable(named, stride_one)
    for name, module in named:
        if type(module) is nn.Conv2d and can_halo(module):
            module.__class__ = HaloConv2d
        elif type(module) is nn.GroupNorm:
            module.__class__ = PatchGroupNorm
        elif not isinstance(module, (HaloConv2d, PatchGroupNorm)):
            continue
        module._tessera_ctx = ctx
        module._tessera_name = name


def _self_attention(model: nn.Module, key: str) -> bool:
    attn = model.get_submodule(key.rsplit(".processor", 1)[0])
    return not getattr(attn, "is_cross_attention", False)


def install_processors(model: nn.Module, wrap: Callable[[str, object], object]) -> None:
    """Replace every self-attention processor of `model` by `wrap(key, original)`; processors
    already patch-aware stay. Cross-attention keeps its processor (text K/V: nothing to exchange)."""
    from parallel.patch.attention import is_patch_processor

    processors = {}
    for key, processor in model.attn_processors.items():
        keep = not _self_attention(model, key) or is_patch_processor(processor)
        processors[key] = processor if keep else wrap(key, processor)
    model.set_attn_processor(processors)


def unwrap_processors(model: nn.Module) -> None:
    """Put the original processors back (diffusers' loaders, e.g. load_ip_adapter, rebuild
    every processor from its class with no arguments); `install_processors` wraps again."""
    from parallel.patch.attention import is_patch_processor

    model.set_attn_processor({key: p.original if is_patch_processor(p) else p
                              for key, p in model.attn_processors.items()})


def _dora_convolves_itself(module: nn.Module) -> bool:
    """peft's DoRA on a conv reuses the (patch-aware) base layer's output at inference, but in
    training mode with dropout it runs F.conv2d on the band itself, zero-padding band edges."""
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    base = getattr(module, "base_layer", None)
    if not magnitudes or not module.training or not isinstance(base, nn.Conv2d) or base.kernel_size[0] == 1:
        return False
    return any(not isinstance(d, nn.Identity) for d in getattr(module, "lora_dropout", {}).values())


def check_patch_aware(named: NamedModules, ctx, attention_model: nn.Module | None = None) -> None:
    """Refuse a model changed after the install in a way that would silently break the split:
    a k x k conv or GroupNorm that is not the patch-aware one (or bound to another context),
    or a self-attention processor that is not patch-aware."""
    from parallel.patch.attention import is_patch_processor

    hint = ("was added or replaced after the parallel layers were installed and would not see the other "
            "bands; load adapters with Engine.load_lora and change models in a setup= function")
    for name, module in named:
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1 or type(module) is nn.GroupNorm:
            if not isinstance(module, (HaloConv2d, PatchGroupNorm)) or module._tessera_ctx is not ctx:
                raise ConfigError(f"{name} ({type(module).__name__}) {hint}")
        if _dora_convolves_itself(module):
            raise ConfigError(f"{name}: a DoRA adapter with dropout in training mode convolves its input itself, without "
                              "the other bands' rows; call .eval() on the model (inference reuses the patch-aware base output)")
    if attention_model is not None:
        for key, processor in attention_model.attn_processors.items():
            if _self_attention(attention_model, key) and not is_patch_processor(processor):
                raise ConfigError(f"{key} ({type(processor).__name__}) {hint}")
