"""Images a request carries (init image, inpainting mask, ControlNet conditions), made into
plain uint8 arrays on the caller: they are checked once, pickle small, and travel to the
ranks once per request. Accepted: a PIL image, a (H, W, 3) / (H, W) uint8 numpy array or
a path to an image file.
"""

from __future__ import annotations

import os

import numpy as np

from parallel.errors import ConfigError


def _load(value, what: str):
    from PIL import Image

    if isinstance(value, (str, os.PathLike)):
        try:
            with Image.open(value) as img:
                img.load()
                return img.copy()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what}: cannot read image {os.fspath(value)!r} ({exc})") from None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise ConfigError(f"{what}: a numpy image must be uint8 (0..255), got {value.dtype}")
        return value
    raise ConfigError(f"{what} must be a PIL image, a uint8 numpy array or an image path, got {type(value).__name__}")


def rgb_array(value, what: str) -> np.ndarray:
    """(H, W, 3) uint8."""
    img = _load(value, what)
    array = np.asarray(img.convert("RGB")) if not isinstance(img, np.ndarray) else img
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ConfigError(f"{what}: expected an (H, W, 3) RGB image, got shape {array.shape}")
    return np.ascontiguousarray(array)


def mask_array(value, what: str = "mask_image") -> np.ndarray:
    """(H, W) uint8: 255 where the image is repainted, 0 where it is kept."""
    img = _load(value, what)
    array = np.asarray(img.convert("L")) if not isinstance(img, np.ndarray) else img
    if array.ndim == 3 and array.shape[2] in (1, 3):
        array = array[:, :, 0]
    if array.ndim != 2 or min(array.shape) < 1:
        raise ConfigError(f"{what}: expected an (H, W) mask, got shape {array.shape}")
    return np.ascontiguousarray(array)


def is_latents(value) -> bool:
    """A (B, C, h, w) float tensor or array: latents handed over from another run (the SDXL
    base's output for its refiner, with denoising_end / denoising_start)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and value.ndim == 4
    return isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.ndim == 4


def latent_array(value, channels: int, what: str = "image") -> np.ndarray:
    """(B, C, h, w) float32 latents with the model's `channels`."""
    import torch

    array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else value.astype(np.float32)
    if array.ndim != 4 or array.shape[1] != channels or not np.isfinite(array).all():
        raise ConfigError(f"{what}: latents must be a finite (batch, {channels}, h, w) float tensor, got shape {array.shape}")
    return np.ascontiguousarray(array)


def to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)
