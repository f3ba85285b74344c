"""
Which implementation of the broker's innermost functions runs: the compiled
accelerator (C{zaichik._speedups}, built from C{zaichik/_speedups.c} by
C{pip install} when a C compiler is present) or the pure-Python twins beside
its users (C{codec.parse_publish_py}, C{codec.message_frame_py},
C{storage.segment.encode_batch_py}), which are the specification.

Set C{ZAICHIK_PURE=1} in the environment to use the pure-Python path even
where the accelerator is built (CI runs the suite both ways).

And L{tune_malloc}, which the broker calls once at start.
"""

from __future__ import annotations

import ctypes
import os
import sys
from types import ModuleType
from typing import Optional


def _load() -> Optional[ModuleType]:
    if os.environ.get("ZAICHIK_PURE", "") not in ("", "0"):
        return None
    try:
        from zaichik import _speedups
    except ImportError:
        return None
    return _speedups


#: The compiled module, or None when the pure-Python path runs.
compiled = _load()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> bool:
    """
    Keep large message buffers on malloc's heap rather than in a fresh
    mmap for each.

    glibc serves an allocation over its mmap threshold (128 KiB at first,
    raised only as such blocks are freed) with a mapping of its own, whose
    pages fault in zero-filled on first touch; the heap's top is handed back
    to the kernel past the trim threshold.  A 256 KB message is copied into
    three new buffers (the frame, its value, the MESSAGE frame): that way
    each copy took ~130 us against ~2 us in reused memory, and the broker
    delivered 256 KB values at 0.55x the bare forwarder (bench.py), ~1.0x
    with these thresholds.  The cost: up to C{trim_threshold} bytes of freed
    heap kept for reuse.

    Linux with glibc only; an operator's C{MALLOC_MMAP_THRESHOLD_} or
    C{MALLOC_TRIM_THRESHOLD_} in the environment wins.  Returns whether the
    thresholds were set.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # (musl has a mallopt that does nothing and answers 0.)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
