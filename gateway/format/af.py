"""The LUKS anti-forensic splitter (AF type "luks1"), cryptsetup's af.c.

The key material is spread over ``stripes`` blocks so that destroying any
part of the area destroys the key.  diffuse() hashes each digest-sized chunk
with its big-endian 32-bit index prepended.
"""

from __future__ import annotations

import hashlib
import os

_HASHES = {"sha1", "sha256", "sha512", "sha384", "sha224"}


def _diffuse(block: bytes, hash_name: str) -> bytes:
    digest_size = hashlib.new(hash_name).digest_size
    out = bytearray()
    for i, start in enumerate(range(0, len(block), digest_size)):
        chunk = block[start:start + digest_size]
        h = hashlib.new(hash_name, i.to_bytes(4, "big"))
        h.update(chunk)
        out += h.digest()[:len(chunk)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def _check(hash_name: str, stripes: int) -> None:
    if hash_name not in _HASHES:
        raise ValueError(f"unsupported AF hash {hash_name!r}")
    if stripes < 1:
        raise ValueError("AF stripes must be >= 1")


def split(key: bytes, stripes: int, hash_name: str = "sha256") -> bytes:
    """Return ``len(key) * stripes`` bytes of AF-split material for ``key``."""
    _check(hash_name, stripes)
    size = len(key)
    out = bytearray()
    acc = bytes(size)
    for _ in range(stripes - 1):
        rnd = os.urandom(size)
        out += rnd
        acc = _diffuse(_xor(rnd, acc), hash_name)
    out += _xor(key, acc)
    return bytes(out)


def merge(material: bytes, key_size: int, stripes: int, hash_name: str = "sha256") -> bytearray:
    """Recover the key from AF-split ``material`` (inverse of :func:`split`)."""
    _check(hash_name, stripes)
    if len(material) < key_size * stripes:
        raise ValueError("AF material shorter than key_size * stripes")
    acc = bytes(key_size)
    for i in range(stripes - 1):
        acc = _diffuse(_xor(material[i * key_size:(i + 1) * key_size], acc), hash_name)
    last = (stripes - 1) * key_size
    return bytearray(_xor(material[last:last + key_size], acc))
