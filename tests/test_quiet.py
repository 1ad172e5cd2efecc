"""The known harmless library messages are dropped; anything else still shows (rank 0)."""

import logging
import warnings

from engine.quiet import KNOWN_HARMLESS, is_known_harmless, quiet_libraries

LISTED = ("`torch_dtype` is deprecated and will be removed in version 1.0.0. Please use `dtype` instead.",
          "Cannot initialize model with low cpu memory usage because `accelerate` was not found in the environment.",
          "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`",
          "There are modules in AutoencoderKL that should be kept in float32: ['x']. Casting directly ...",
          "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe to ignore ...")
UNLISTED = "something the user should see"


def test_every_listed_message_is_known_and_an_unlisted_one_is_not():
    assert len(LISTED) == len(KNOWN_HARMLESS)
    assert all(is_known_harmless(m) for m in LISTED)
    assert not is_known_harmless(UNLISTED)


def test_python_warnings_filtered_by_message():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries(rank=0)
        for message in LISTED:
            warnings.warn(message, FutureWarning)
        warnings.warn(UNLISTED, UserWarning)
    assert [str(w.message) for w in caught] == [UNLISTED]


def test_other_ranks_show_no_warnings():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_libraries(rank=1)
            warnings.warn(UNLISTED, UserWarning)
        assert caught == []
        assert all(lib.get_verbosity() == logging.ERROR for lib, _ in levels)
    finally:  # the rest of this test process keeps its library log levels
        for lib, level in levels:
            lib.set_verbosity(level)


def test_library_log_records_filtered_by_message():
    quiet_libraries(rank=0)
    for name in ("diffusers", "transformers"):
        handlers = logging.getLogger(name).handlers
        assert handlers

        def passes(message):  # a child logger's record, as the libraries log them
            record = logging.LogRecord(f"{name}.some.module", logging.WARNING, __file__, 1, message, None, None)
            return all(h.filter(record) for h in handlers)

        assert not any(passes(m) for m in LISTED)
        assert passes(UNLISTED)
