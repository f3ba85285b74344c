"""
Human-friendly durations, for the command line and twistd's options.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_UNIT_MS = {"ms": 1, None: 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int:
    """
    Milliseconds from C{"500"} (a plain number is milliseconds), C{"500ms"},
    C{"60s"}, C{"5m"}, C{"2h"} or C{"7d"}.

    @raise ValueError: for anything else.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (try 500ms, 60s, 5m, 2h)")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


def format_duration(ms: int) -> str:
    """The shortest exact form: C{0}, C{500ms}, C{60s}, C{5m}, C{2h}, C{7d}."""
    if ms == 0:
        return "0"
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_MS[unit]
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
