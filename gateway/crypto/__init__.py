"""The data cipher: aes-xts-plain64 over whole sectors.

Its names load on first use (PEP 562): the cipher needs numpy, which costs
more to import than most ``evlu`` and ``gatewayd`` commands take to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .xts import CryptoError, SectorCipher

__all__ = ["CryptoError", "SectorCipher"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import xts
        return getattr(xts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
