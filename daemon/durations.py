"""Durations as people write them on a command line: ``90``, ``90s``, ``1.5m``, ``15m``, ``2h``, ``1d``."""

from __future__ import annotations

import re

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([0-9]{1,9}(?:\.[0-9]{1,9})?)\s*([smhd]?)\s*", re.ASCII)


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (a bare number is seconds); ValueError for anything else."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 90, 90s, 15m, 2h)")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]
