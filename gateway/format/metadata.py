"""The LUKS2 JSON metadata: parsing, validation and typed views.

The metadata is kept as the JSON object read from disk so that fields this
implementation does not interpret (other token types, keyslot priorities,
flags written by cryptsetup) survive a rewrite untouched.  :func:`parse`
validates everything the rest of the code relies on; accessors return typed
views.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import FormatError, UnsupportedError

MAX_SLOTS = 32  # LUKS2_KEYSLOTS_MAX and LUKS2_TOKENS_MAX
MAX_DEPTH = 32  # cryptsetup (json-c) refuses deeper nesting
MAX_KEYSLOTS_SIZE = 128 << 20  # LUKS2_MAX_KEYSLOTS_SIZE
EVLU_TOKEN = "evlu-kmip"
_U64 = re.compile(r"[0-9]{1,20}\Z")
_ID = re.compile(r"(?:[0-9]|[12][0-9]|3[01])\Z")


def _ctx(path: str, msg: str) -> FormatError:
    return FormatError(f"metadata {path}: {msg}")


def _obj(parent: dict, key: str, path: str) -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise _ctx(f"{path}.{key}", "missing or not an object")
    return value


def _str(parent: dict, key: str, path: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str):
        raise _ctx(f"{path}.{key}", "missing or not a string")
    return value


def _int(parent: dict, key: str, path: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = parent.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _ctx(f"{path}.{key}", f"missing or not an integer in [{lo}, {hi}]")
    return value


def _u64(parent: dict, key: str, path: str) -> int:
    value = parent.get(key)
    if not isinstance(value, str) or not _U64.match(value) or int(value) >= 2**64:
        raise _ctx(f"{path}.{key}", "missing or not a decimal 64-bit string")
    return int(value)


def _b64(parent: dict, key: str, path: str) -> bytes:
    value = parent.get(key)
    if not isinstance(value, str):
        raise _ctx(f"{path}.{key}", "missing or not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _ctx(f"{path}.{key}", "invalid base64") from None


def _ids(parent: dict, key: str, path: str) -> list[int]:
    value = parent.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and _ID.match(v) for v in value):
        raise _ctx(f"{path}.{key}", "missing or not a list of slot ids")
    return [int(v) for v in value]


def _section(root: dict, name: str) -> dict[int, dict]:
    section = _obj(root, name, "")
    out: dict[int, dict] = {}
    for key, value in section.items():
        if not _ID.match(key):
            raise _ctx(f"{name}.{key}", "invalid id")
        if not isinstance(value, dict):
            raise _ctx(f"{name}.{key}", "not an object")
        out[int(key)] = value
    return out


@dataclass(frozen=True)
class Kdf:
    type: str  # "pbkdf2", "argon2i" or "argon2id"
    salt: bytes
    hash: str = ""  # pbkdf2
    iterations: int = 0  # pbkdf2
    time: int = 0  # argon2
    memory: int = 0  # argon2, KiB
    cpus: int = 0  # argon2


@dataclass(frozen=True)
class Keyslot:
    id: int
    key_size: int
    kdf: Kdf
    af_stripes: int
    af_hash: str
    area_offset: int
    area_size: int
    area_encryption: str
    area_key_size: int


@dataclass(frozen=True)
class Segment:
    id: int
    offset: int
    size: int | None  # None = "dynamic"
    iv_tweak: int
    encryption: str
    sector_size: int


@dataclass(frozen=True)
class Digest:
    id: int
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str
    iterations: int
    salt: bytes
    digest: bytes


@dataclass(frozen=True)
class EvluToken:
    """The ``evlu-kmip`` token: binds keyslots (normally one) to a KEK in a KMIP
    key manager.  cryptsetup's luksKillSlot leaves a token with no keyslot."""

    id: int
    keyslots: tuple[int, ...]
    key_id: str
    kms: str


def _kdf(ks: dict, path: str) -> Kdf:
    kdf = _obj(ks, "kdf", path)
    kind = _str(kdf, "type", f"{path}.kdf")
    salt = _b64(kdf, "salt", f"{path}.kdf")
    if kind == "pbkdf2":
        return Kdf(kind, salt, hash=_str(kdf, "hash", f"{path}.kdf"),
                   iterations=_int(kdf, "iterations", f"{path}.kdf", 1, 2**32 - 1))
    if kind in ("argon2i", "argon2id"):
        return Kdf(kind, salt, time=_int(kdf, "time", f"{path}.kdf", 1, 2**32 - 1),
                   memory=_int(kdf, "memory", f"{path}.kdf", 8, 4 * 1024 * 1024),
                   cpus=_int(kdf, "cpus", f"{path}.kdf", 1, 64))
    raise _ctx(f"{path}.kdf.type", f"unknown kdf {kind!r}")


def _keyslot(i: int, ks: dict) -> Keyslot | None:
    path = f"keyslots.{i}"
    kind = _str(ks, "type", path)
    if kind != "luks2":
        return None  # e.g. "reencrypt": kept, never used to unlock
    af = _obj(ks, "af", path)
    area = _obj(ks, "area", path)
    if _str(af, "type", f"{path}.af") != "luks1":
        raise _ctx(f"{path}.af.type", "unknown AF type")
    if _str(area, "type", f"{path}.area") != "raw":
        raise _ctx(f"{path}.area.type", "unknown area type")
    return Keyslot(
        id=i, key_size=_int(ks, "key_size", path, 1, 512), kdf=_kdf(ks, path),
        af_stripes=_int(af, "stripes", f"{path}.af", 1, 65536),
        af_hash=_str(af, "hash", f"{path}.af"),
        area_offset=_u64(area, "offset", f"{path}.area"),
        area_size=_u64(area, "size", f"{path}.area"),
        area_encryption=_str(area, "encryption", f"{path}.area"),
        area_key_size=_int(area, "key_size", f"{path}.area", 1, 512))


def _segment(i: int, seg: dict) -> Segment:
    path = f"segments.{i}"
    size = seg.get("size")
    if _str(seg, "type", path) != "crypt":
        raise UnsupportedError(f"segment {i} has type {seg.get('type')!r}; only 'crypt' is supported")
    sector_size = _int(seg, "sector_size", path, 512, 4096)
    if sector_size & (sector_size - 1):
        raise _ctx(f"{path}.sector_size", "not a power of two")
    return Segment(
        id=i, offset=_u64(seg, "offset", path),
        size=None if size == "dynamic" else _u64(seg, "size", path),
        iv_tweak=_u64(seg, "iv_tweak", path), encryption=_str(seg, "encryption", path),
        sector_size=sector_size)


def _digest(i: int, dg: dict) -> Digest:
    path = f"digests.{i}"
    if _str(dg, "type", path) != "pbkdf2":
        raise UnsupportedError(f"digest {i} has type {dg.get('type')!r}; only pbkdf2 is supported")
    return Digest(id=i, keyslots=tuple(_ids(dg, "keyslots", path)),
                  segments=tuple(_ids(dg, "segments", path)), hash=_str(dg, "hash", path),
                  iterations=_int(dg, "iterations", path, 1, 2**32 - 1),
                  salt=_b64(dg, "salt", path), digest=_b64(dg, "digest", path))


class Metadata:
    """Validated LUKS2 JSON metadata (immutable: edits return a new object)."""

    def __init__(self, obj: dict[str, Any], hdr_size: int) -> None:
        self._obj = obj
        self.hdr_size = hdr_size
        self.keyslots: dict[int, Keyslot] = {}
        #: keyslots that do not parse: ignored unless used, as cryptsetup does
        self.broken_keyslots: dict[int, str] = {}
        self.raw_keyslots = _section(obj, "keyslots")
        for i, ks in self.raw_keyslots.items():
            try:
                parsed = _keyslot(i, ks)
            except FormatError as exc:
                self.broken_keyslots[i] = str(exc)
                continue
            if parsed is not None:
                self.keyslots[i] = parsed
        self.segments = {i: _segment(i, s) for i, s in _section(obj, "segments").items()}
        self.digests = {i: _digest(i, d) for i, d in _section(obj, "digests").items()}
        self.raw_tokens = _section(obj, "tokens")
        config = _obj(obj, "config", "")
        self.json_size = _u64(config, "json_size", "config")
        self.keyslots_size = _u64(config, "keyslots_size", "config")
        self.requirements = config.get("requirements", {})
        self._validate()

    # -- validation ---------------------------------------------------------

    def _validate(self) -> None:
        if self.json_size != self.hdr_size - 4096:
            raise _ctx("config.json_size", f"{self.json_size} does not match hdr_size {self.hdr_size}")
        if self.keyslots_size % 4096 or self.keyslots_size > MAX_KEYSLOTS_SIZE:
            raise _ctx("config.keyslots_size", "not 4096-aligned or above 128 MiB")
        for i, tok in self.raw_tokens.items():
            _str(tok, "type", f"tokens.{i}")
            for ks in _ids(tok, "keyslots", f"tokens.{i}"):
                if ks not in self.raw_keyslots:
                    raise _ctx(f"tokens.{i}.keyslots", f"references missing keyslot {ks}")
        for dg in self.digests.values():
            for ks in dg.keyslots:
                if ks not in self.raw_keyslots:
                    raise _ctx(f"digests.{dg.id}", f"references missing keyslot {ks}")
            for seg in dg.segments:
                if seg not in self.segments:
                    raise _ctx(f"digests.{dg.id}", f"references missing segment {seg}")
        start, end = 2 * self.hdr_size, 2 * self.hdr_size + self.keyslots_size
        areas = sorted(self.areas())
        for lo, hi in areas:
            if lo < start or hi > end or lo >= hi:
                raise _ctx("keyslots", f"area [{lo}, {hi}) outside the keyslots area [{start}, {end})")
        for (_, hi), (lo, _) in zip(areas, areas[1:]):
            if lo < hi:
                raise _ctx("keyslots", "keyslot areas overlap")
        for seg in self.segments.values():
            if seg.offset < end:
                raise _ctx(f"segments.{seg.id}.offset", "overlaps the metadata or keyslots area")
            if seg.offset % seg.sector_size:
                raise _ctx(f"segments.{seg.id}.offset", "not aligned to the sector size")

    def areas(self) -> list[tuple[int, int]]:
        """[start, end) of every keyslot area, broken keyslots included.

        Raises when a keyslot's area cannot be located (nothing may then be
        allocated safely)."""
        out = []
        for i, ks in self.raw_keyslots.items():
            if i in self.keyslots:
                parsed = self.keyslots[i]
                out.append((parsed.area_offset, parsed.area_offset + parsed.area_size))
                continue
            area = ks.get("area")
            if isinstance(area, dict) and area.get("type") == "none":
                continue
            if not isinstance(area, dict):
                raise _ctx(f"keyslots.{i}.area", "missing: the keyslot's area cannot be located")
            offset = _u64(area, "offset", f"keyslots.{i}.area")
            out.append((offset, offset + _u64(area, "size", f"keyslots.{i}.area")))
        return out

    # -- views --------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A deep copy of the JSON object, for editing."""
        return copy.deepcopy(self._obj)

    def encode(self) -> bytes:
        """The JSON area: compact JSON, zero-padded to ``json_size``."""
        try:
            text = json.dumps(self._obj, separators=(",", ":"), allow_nan=False).encode("ascii")
        except (TypeError, ValueError) as exc:
            raise FormatError(f"metadata cannot be encoded: {exc}") from None
        if len(text) >= self.json_size:
            raise FormatError("metadata does not fit the JSON area")
        return text + bytes(self.json_size - len(text))

    @property
    def data_segment(self) -> Segment:
        """The single crypt segment (the encrypted data area)."""
        if self.requirements:
            raise UnsupportedError(f"device has LUKS2 requirements {self.requirements!r} "
                                   "(e.g. an unfinished reencryption): finish it with cryptsetup")
        if len(self.segments) != 1:
            raise UnsupportedError(f"device has {len(self.segments)} segments; exactly one is supported")
        return next(iter(self.segments.values()))

    def evlu_tokens(self) -> list[EvluToken]:
        """The well-formed evlu-kmip tokens (see :meth:`broken_tokens` for the others)."""
        return [t for t in self._evlu_tokens() if isinstance(t, EvluToken)]

    def broken_tokens(self) -> dict[int, str]:
        """evlu-kmip tokens that cannot be used, and why."""
        return {i: why for i, why in (t for t in self._evlu_tokens() if isinstance(t, tuple))}

    def _evlu_tokens(self) -> list[EvluToken | tuple[int, str]]:
        out: list[EvluToken | tuple[int, str]] = []
        for i, tok in sorted(self.raw_tokens.items()):
            if tok.get("type") != EVLU_TOKEN:
                continue
            path = f"tokens.{i}"
            try:
                key_id = _str(tok, "key_id", path)
                if not key_id:
                    raise _ctx(f"{path}.key_id", "empty")
                out.append(EvluToken(id=i, keyslots=tuple(_ids(tok, "keyslots", path)),
                                     key_id=key_id, kms=_str(tok, "kms", path)))
            except FormatError as exc:
                out.append((i, str(exc)))
        return out

    def digest_for_segment(self, segment: int) -> Digest:
        for dg in self.digests.values():
            if segment in dg.segments:
                return dg
        raise FormatError(f"no digest covers segment {segment}")

    def digest_for_keyslot(self, keyslot: int) -> Digest:
        for dg in self.digests.values():
            if keyslot in dg.keyslots:
                return dg
        raise FormatError(f"keyslot {keyslot} is not assigned to any digest")


def decode(json_area: bytes, hdr_size: int) -> Metadata:
    """Parse and validate a JSON area (NUL-terminated JSON text)."""
    end = json_area.find(b"\0")
    if end < 0:
        raise FormatError("JSON area is not NUL-terminated")
    try:
        obj = json.loads(json_area[:end].decode("utf-8"), parse_constant=_reject_constant,
                         parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"JSON area does not parse: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise FormatError("JSON metadata is not an object")
    _check_depth(obj)
    return Metadata(obj, hdr_size)


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"JSON number {text} is out of range")
    return value


def _check_depth(obj: object) -> None:
    """Refuse nesting deeper than cryptsetup accepts (iteratively: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FormatError(f"JSON metadata nested deeper than {MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)
