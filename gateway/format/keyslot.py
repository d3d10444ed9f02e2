"""LUKS2 keyslots and digests: KDFs, AF material, area encryption.

Sans-IO: functions take and return bytes; the caller reads and writes the
keyslot area.  A keyslot's passphrase here is the raw KEK from the key
manager (a 256-bit random key), so PBKDF2 stretching adds nothing to its
strength; the iteration count only has to satisfy cryptsetup.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from .. import crypto
from . import af
from .errors import FormatError, UnsupportedError, WrongKeyError
from .metadata import Digest, Kdf, Keyslot

AREA_ENCRYPTION = "aes-xts-plain64"
AF_STRIPES = 4000
AF_HASH = "sha256"
KDF_ITERATIONS = 1000  # cryptsetup's minimum for pbkdf2; KEKs are full-entropy keys
DIGEST_ITERATIONS = 1000
SALT_SIZE = 32
_PBKDF2_HASHES = {"sha1", "sha256", "sha512"}
#: refuse KDF costs no honest header uses, so a hostile header cannot stall an
#: unlock for long: pbkdf2 work counts iterations x output blocks (cryptsetup's
#: 2-second benchmark gives a few million); argon2 is capped at cryptsetup's
#: 4 GiB and at a memory x passes product of 16 GiB.
MAX_PBKDF2_WORK = 1 << 24
MAX_ARGON2_MEMORY_KIB = 4 << 20
MAX_ARGON2_WORK_KIB = 16 << 20
MAX_DIGEST_SIZE = 64


def area_size(key_size: int, stripes: int = AF_STRIPES) -> int:
    """Bytes a keyslot area needs (AF material rounded up to 4096, as cryptsetup)."""
    return -(-key_size * stripes // 4096) * 4096


def _material_size(ks: Keyslot) -> int:
    return -(-ks.key_size * ks.af_stripes // 512) * 512


def derive(kdf: Kdf, passphrase: bytes, length: int) -> bytearray:
    """Run the keyslot's KDF."""
    if kdf.type == "pbkdf2":
        if kdf.hash not in _PBKDF2_HASHES:
            raise UnsupportedError(f"pbkdf2 hash {kdf.hash!r} is not supported")
        _check_pbkdf2(kdf.hash, kdf.iterations, length)
        return bytearray(hashlib.pbkdf2_hmac(kdf.hash, passphrase, kdf.salt, kdf.iterations, length))
    if kdf.memory > MAX_ARGON2_MEMORY_KIB or kdf.memory * kdf.time > MAX_ARGON2_WORK_KIB:
        raise UnsupportedError(f"{kdf.type} cost (time {kdf.time}, memory {kdf.memory} KiB) "
                               "exceeds the limit")
    from cryptography.hazmat.primitives.kdf import argon2

    cls = {"argon2id": getattr(argon2, "Argon2id", None), "argon2i": getattr(argon2, "Argon2i", None)}[kdf.type]
    if cls is None:
        raise UnsupportedError(f"{kdf.type} needs a newer 'cryptography' package")
    try:
        out = cls(salt=kdf.salt, length=length, iterations=kdf.time, lanes=kdf.cpus,
                  memory_cost=kdf.memory).derive(bytes(passphrase))
    except ValueError as exc:
        raise FormatError(f"invalid {kdf.type} parameters: {exc}") from None
    return bytearray(out)


def _check_pbkdf2(hash_name: str, iterations: int, length: int) -> None:
    blocks = -(-length // hashlib.new(hash_name).digest_size)
    if iterations * blocks > MAX_PBKDF2_WORK:
        raise UnsupportedError(f"pbkdf2 with {iterations} iterations for {length} bytes "
                               "exceeds the limit")


def material_length(ks: Keyslot) -> int:
    """How many bytes of the area :func:`unwrap` needs."""
    if _material_size(ks) > ks.area_size:
        raise FormatError(f"keyslot {ks.id}: AF material larger than its area")
    return _material_size(ks)


def unwrap(ks: Keyslot, area: bytes, passphrase: bytes) -> bytearray:
    """Recover the (unverified) volume key from a keyslot area."""
    if ks.af_hash not in {"sha1", "sha256", "sha512"}:
        raise UnsupportedError(f"AF hash {ks.af_hash!r} is not supported")
    if len(area) < material_length(ks):
        raise FormatError(f"keyslot {ks.id}: area truncated")
    if ks.area_encryption != AREA_ENCRYPTION or ks.area_key_size not in (32, 64):
        raise UnsupportedError(f"keyslot {ks.id} area {ks.area_encryption!r} with a "
                               f"{ks.area_key_size}-byte key is not supported")
    key = derive(ks.kdf, passphrase, ks.area_key_size)
    try:
        with crypto.SectorCipher(key, 512) as cipher:
            plain = cipher.decrypt(area[:material_length(ks)], 0)
    except crypto.CryptoError as exc:
        raise FormatError(f"keyslot {ks.id}: {exc}") from None
    finally:
        key[:] = bytes(len(key))
    return af.merge(plain, ks.key_size, ks.af_stripes, ks.af_hash)


def wrap(volume_key: bytes, passphrase: bytes, *, area_offset: int,
         iterations: int = KDF_ITERATIONS) -> tuple[dict, bytes]:
    """Make a new keyslot: its JSON object and the bytes of its whole area."""
    key_size = len(volume_key)
    size = area_size(key_size)
    kdf = Kdf("pbkdf2", os.urandom(SALT_SIZE), hash="sha256", iterations=iterations)
    slot_json = {
        "type": "luks2", "key_size": key_size,
        "af": {"type": "luks1", "stripes": AF_STRIPES, "hash": AF_HASH},
        "area": {"type": "raw", "offset": str(area_offset), "size": str(size),
                 "encryption": AREA_ENCRYPTION, "key_size": 64},
        "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": iterations,
                "salt": base64.b64encode(kdf.salt).decode()},
    }
    key = derive(kdf, passphrase, 64)
    try:
        material = af.split(bytes(volume_key), AF_STRIPES, AF_HASH)
        with crypto.SectorCipher(key, 512) as cipher:
            encrypted = cipher.encrypt(material + bytes(-len(material) % 512), 0)
    finally:
        key[:] = bytes(len(key))
    return slot_json, encrypted + os.urandom(size - len(encrypted))


def make_digest(volume_key: bytes, keyslots: list[int], segments: list[int],
                iterations: int = DIGEST_ITERATIONS) -> dict:
    """A pbkdf2 digest object that verifies ``volume_key``."""
    salt = os.urandom(SALT_SIZE)
    value = hashlib.pbkdf2_hmac("sha256", bytes(volume_key), salt, iterations, 32)
    return {"type": "pbkdf2", "keyslots": [str(k) for k in keyslots],
            "segments": [str(s) for s in segments], "hash": "sha256", "iterations": iterations,
            "salt": base64.b64encode(salt).decode(), "digest": base64.b64encode(value).decode()}


def verify(digest: Digest, volume_key: bytes) -> None:
    """Raise :class:`WrongKeyError` unless ``volume_key`` matches ``digest``."""
    if digest.hash not in _PBKDF2_HASHES or not 0 < len(digest.digest) <= MAX_DIGEST_SIZE:
        raise UnsupportedError(f"digest {digest.id}: unsupported hash {digest.hash!r} or size")
    _check_pbkdf2(digest.hash, digest.iterations, len(digest.digest))
    value = hashlib.pbkdf2_hmac(digest.hash, bytes(volume_key), digest.salt, digest.iterations,
                                len(digest.digest))
    if not hmac.compare_digest(value, digest.digest):
        raise WrongKeyError("the key does not match the volume (LUKS2 digest mismatch)")
