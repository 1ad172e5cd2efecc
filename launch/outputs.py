"""Where the CLI writes, checked before any rank starts: a bad path must not cost the work."""

from __future__ import annotations

import os

from parallel.config import ConfigError

IMAGE_FORMATS = (".png", ".jpg", ".jpeg", ".webp")
REPORT_FORMATS = (".json",)
VIDEO_FORMATS = (".gif", ".mp4")


def check_output_path(path: str, formats: tuple[str, ...], what: str, folder: bool = False) -> None:
    """`path` has one of `formats` (or, with `folder`, no extension: a folder to create) and
    can be written: it is not a directory (unless a folder is wanted), and its nearest
    existing ancestor is a writable directory."""
    ext = os.path.splitext(path)[1].lower()
    wanted = ", ".join(formats) + (" or a folder (no extension)" if folder else "")
    if ext not in formats and not (folder and not ext):
        raise ConfigError(f"{what} {path}: unknown format {ext or '(no extension)'}; use {wanted}")
    target = os.path.abspath(path)
    if os.path.isdir(target) and not (folder and not ext):
        raise ConfigError(f"{what} {path} is a directory; name a file ({wanted})")
    if folder and not ext and os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"{what} {path} is a file; a folder of frames needs a new or existing directory")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {parent} is not writable")
