"""Parsing sizes given on the command line (``16M``, ``1040KiB``, ``4096``)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+)\s*([kmgt]?)(?:i?b)?\s*\Z", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional binary unit (K, M, G, T; KiB...)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: use bytes or a unit such as 16M or 1040KiB")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]
