"""Known harmless library messages, silenced in the engine's own processes.

Loading a diffusers pipeline on a CPU machine prints deprecation notes, install advice and
loading bars that mean nothing to a user, once per rank. `quiet_libraries(rank)` drops
exactly the messages listed here (Python warnings by message, and the transformers /
diffusers logging records by message); anything else still shows, on rank 0 only, so a
warning never appears once per rank. Ranks other than 0 run the same code: what they would
warn about, rank 0 warns about too.
"""

from __future__ import annotations

import logging
import re
import warnings

# Regexes searched in a warning's or log record's message. Each one means nothing for a
# Tessera run: a deprecated argument name the engine passes for older diffusers versions,
# optional speed-ups of model *loading* (accelerate) or of image processors the engine never
# uses (torchvision), a note about a dtype cast of modules that the engine casts on purpose, and
# diffusers' note that a LoRA has no text-encoder part (most LoRAs adapt the denoiser only).
KNOWN_HARMLESS = (
    r"`torch_dtype` is deprecated",
    r"Cannot initialize model with low cpu memory usage because `accelerate`",
    r"requires torchvision \(not installed\)",
    r"modules in \w+ that should be kept in float32",
    r"No LoRA keys associated to \w+ found with the prefix",
)
LIBRARIES = ("diffusers", "transformers")
_PATTERN = re.compile("|".join(KNOWN_HARMLESS))


class KnownHarmless(logging.Filter):
    """Drops library log records whose message is listed in KNOWN_HARMLESS."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _PATTERN.search(record.getMessage())


_FILTER = KnownHarmless()


def is_known_harmless(message: str) -> bool:
    return bool(_PATTERN.search(str(message)))


def quiet_libraries(rank: int = 0) -> None:
    """Silence the known messages in this process (idempotent); on ranks other than 0 also
    every other warning and library log below ERROR. Loading progress bars go too: a spawned
    rank's bars interleave with rank 0's output."""
    for pattern in KNOWN_HARMLESS:
        # `message` must match from the start of the warning's text
        warnings.filterwarnings("ignore", message=".*" + pattern)
    if rank != 0:
        warnings.simplefilter("ignore")
    for name in LIBRARIES:
        _quiet_library(name, rank)


def _quiet_library(name: str, rank: int) -> None:
    import importlib

    try:
        lib = importlib.import_module(f"{name}.utils.logging")
    except ImportError:
        return
    lib.get_logger(name)  # creates the library's own handler, where its records end up
    lib.disable_progress_bar()
    if rank != 0:
        lib.set_verbosity_error()
    # A filter on the logger would not see records of its child loggers; its handlers do.
    for handler in logging.getLogger(name).handlers:
        handler.addFilter(_FILTER)
