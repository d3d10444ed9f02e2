"""The data cipher: aes-xts-plain64 over whole sectors."""

from .xts import CryptoError, SectorCipher

__all__ = ["CryptoError", "SectorCipher"]
