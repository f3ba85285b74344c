"""
Which implementation of the broker's innermost functions runs: the compiled
accelerator (C{zaichik._speedups}, built from C{zaichik/_speedups.c} by
C{pip install} when a C compiler is present) or the pure-Python twins beside
its users (C{codec.parse_publish_py}, C{codec.message_frame_py},
C{storage.segment.encode_batch_py}), which are the specification.

Set C{ZAICHIK_PURE=1} in the environment to use the pure-Python path even
where the accelerator is built (CI runs the suite both ways).

And L{crc32}, the checksum of the storage's batches, and L{tune_malloc}
and L{tune_gc}, which the broker calls once at start.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from types import ModuleType
from typing import Optional, Tuple


# What the rest of zaichik takes from the compiled module: one built from
# an older _speedups.c (a checkout updated without rebuilding) lacks some,
# and then the pure-Python path runs rather than an import failing.
_NAMES = ("parse_publish", "parse_publish_batch", "parse_publish_run", "parse_ws_publish_run", "ws_frames",
          "message_frame", "message_frames", "plain_message_frames", "plain_message_block", "split_frames",
          "encode_records", "decode_records", "encode_batch", "use_crc32", "Entries")


def _load() -> Optional[ModuleType]:
    if os.environ.get("ZAICHIK_PURE", "") not in ("", "0"):
        return None
    try:
        from zaichik import _speedups
    except ImportError:
        return None
    if not all(hasattr(_speedups, name) for name in _NAMES):
        return None
    return _speedups


#: The compiled module, or None when the pure-Python path runs.
compiled = _load()

# The CRC-32 of every batch written to or read from disk (zlib's polynomial:
# the same values either way).  zlib-ng's uses the CPU's carry-less
# multiply: 0.017 ms a MiB here against 0.154 for the zlib Python is built
# with, which was 40% of the disk's cost per message with --fsync never.
try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover (a platform without its wheels)
    from zlib import crc32

if compiled is not None:
    compiled.use_crc32(crc32)


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


#: CPython's cycle collector thresholds for the broker (the default is
#: (700, 10, 10)); C{ZAICHIK_GC_THRESHOLD="700,10,10"} in the environment wins.
GC_THRESHOLD = (50_000, 20, 100)


def gc_threshold() -> Tuple[int, int, int]:
    """L{GC_THRESHOLD}, or the environment's; ValueError if that is not three whole numbers."""
    value = os.environ.get("ZAICHIK_GC_THRESHOLD", "")
    if not value:
        return GC_THRESHOLD
    try:
        first, second, third = (int(part) for part in value.split(","))
    except ValueError:
        raise ValueError(f"ZAICHIK_GC_THRESHOLD is three whole numbers, as 700,10,10: not {value!r}") from None
    return first, second, third


def tune_gc() -> Tuple[int, int, int]:
    """
    Look for reference cycles less often (L{gc_threshold}).

    Each message makes a few container objects (its entry, its topic's
    group, a unit of work's bookkeeping), nearly all freed by their
    reference counts; at CPython's default thresholds the collector ran
    every 700 of them and, through the older generations, kept walking
    every live object: with 10,000 connections, each message cost more in
    collections than in its own work.  bench.py, the same code, default
    against these thresholds: 10,000 topics over 10,000 connections 25,937
    -> 52,218 msgs/s, 100 topics x 1 subscriber 1.80M -> 3.20M, 1 -> 1 4.30M
    -> 5.28M; p99 at 20,000 msgs/s unchanged (0.27-0.31 -> 0.26-0.28 ms),
    p99.9 0.53-0.99 -> 1.42-1.46 ms (a young collection is now of up to
    50,000 objects).  The cost: cyclic garbage waits longer for collection.

    Returns the thresholds set.
    """
    threshold = gc_threshold()
    gc.set_threshold(*threshold)
    return threshold
