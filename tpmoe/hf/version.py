"""The transformers releases tpmoe.hf is tested with, and the one line a user reads outside them.

The suite runs on the newest release of the range (tools/ensure_deps.py pins it;
tests/hf/test_hf_families.py checks the pin is what is installed, so the next release is noticed);
pyproject's `hf` extra claims the same range.
"""
import functools
import warnings
from typing import Optional, Tuple

TESTED_MIN = (5, 24)   # the oldest release the HF tests pass on
TESTED_BELOW = (5, 26)  # the first release not tested
TESTED_SPEC = "transformers>={}.{},<{}.{}".format(*TESTED_MIN, *TESTED_BELOW)


def release(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string: "5.25.0" and "5.25.0.dev0" -> (5, 25)."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def untested_message(version: str) -> Optional[str]:
    """None where `version` is in the tested range, else the one line that says so."""
    if TESTED_MIN <= release(version) < TESTED_BELOW:
        return None
    return (f"tpmoe.hf is tested with {TESTED_SPEC}, this is transformers {version}: blocks are judged by their "
            f"code, so a changed family is refused rather than run wrongly, but the refusals may differ "
            f"(pip install '{TESTED_SPEC}')")


@functools.lru_cache(maxsize=None)
def warn_if_untested(version: str) -> Optional[str]:
    """Warns once per process for a release outside the tested range; returns the message (or None)."""
    message = untested_message(version)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=4)
    return message
