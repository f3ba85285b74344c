"""
Which implementation of the broker's innermost functions runs: the compiled
accelerator (C{zaichik._speedups}, built from C{zaichik/_speedups.c} by
C{pip install} when a C compiler is present) or the pure-Python twins beside
its users (C{codec.parse_publish_py}, C{codec.message_frame_py},
C{storage.segment.encode_batch_py}), which are the specification.

Set C{ZAICHIK_PURE=1} in the environment to use the pure-Python path even
where the accelerator is built (CI runs the suite both ways).
"""

from __future__ import annotations

import os
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
