"""Sizes as users type them (512M, 1.5G) and as bytes."""

from __future__ import annotations

import re

from halollm.errors import HaloError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'512M', '1.5G', '2GiB', '1000000' -> bytes (binary multiples)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise HaloError(f"not a size: {text!r} (use e.g. 512M, 1.5G or a number of bytes)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise HaloError(f"a memory budget must be positive (got {text!r})")
    return int(value)
