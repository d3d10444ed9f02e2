"""The LUKS2 binary header (4096 bytes, big-endian) and its checksum.

Layout (cryptsetup lib/luks2/luks2.h, struct luks2_hdr_disk)::

    0   magic[6]        "LUKS\\xba\\xbe" primary, "SKUL\\xba\\xbe" secondary
    6   version u16     2
    8   hdr_size u64    binary header + JSON area (16 KiB .. 4 MiB)
    16  seqid u64
    24  label[48]
    72  checksum_alg[32] "sha256"
    104 salt[64]
    168 uuid[40]
    208 subsystem[48]
    256 hdr_offset u64
    264 padding[184]
    448 csum[64]
    512 padding to 4096

The checksum is computed over the whole ``hdr_size`` area (this binary header
with ``csum`` zeroed, followed by the JSON area).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from .errors import FormatError

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
BINARY_SIZE = 4096
#: every hdr_size LUKS2 allows, i.e. the offsets where a secondary header may sit
HDR_SIZES = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB
CSUM_ALG = "sha256"

_STRUCT = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_OFFSET = 448
assert _STRUCT.size == 512


def _cstr(raw: bytes, field: str) -> str:
    text = raw[:-1].split(b"\0", 1)[0]  # the last byte is always the terminator, as cryptsetup
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"binary header field {field} is not ASCII") from None


@dataclass(frozen=True)
class BinaryHeader:
    """One decoded copy of the binary header."""

    primary: bool
    hdr_size: int
    seqid: int
    label: str
    uuid: str
    subsystem: str
    salt: bytes
    hdr_offset: int

    def pack(self, json_area: bytes) -> bytes:
        """Return ``hdr_size`` bytes: this header with its checksum, then ``json_area``."""
        if len(json_area) != self.hdr_size - BINARY_SIZE:
            raise FormatError("JSON area size does not match hdr_size")
        raw = bytearray(self._pack_without_csum())
        raw[_CSUM_OFFSET:_CSUM_OFFSET + 32] = _checksum(bytes(raw), json_area)
        return bytes(raw) + json_area

    def pack_without_checksum(self) -> bytes:
        """The 4096-byte binary header with a zero checksum (an invalid copy)."""
        return self._pack_without_csum()

    def _pack_without_csum(self) -> bytes:
        for name, value, size in (("label", self.label, 48), ("uuid", self.uuid, 40),
                                  ("subsystem", self.subsystem, 48)):
            if len(value.encode("ascii")) >= size:
                raise FormatError(f"{name} longer than {size - 1} bytes")
        if len(self.salt) != 64:
            raise FormatError("header salt must be 64 bytes")
        head = _STRUCT.pack(
            MAGIC_PRIMARY if self.primary else MAGIC_SECONDARY, VERSION, self.hdr_size,
            self.seqid, self.label.encode("ascii"), CSUM_ALG.encode("ascii"), self.salt,
            self.uuid.encode("ascii"), self.subsystem.encode("ascii"), self.hdr_offset,
            b"", b"")
        return head + bytes(BINARY_SIZE - len(head))


def _checksum(binary: bytes, json_area: bytes) -> bytes:
    h = hashlib.sha256(binary[:_CSUM_OFFSET])
    h.update(bytes(64))
    h.update(binary[_CSUM_OFFSET + 64:BINARY_SIZE])
    h.update(json_area)
    return h.digest()


def has_magic(raw: bytes) -> bool:
    """True if ``raw`` starts with either LUKS magic (any version)."""
    return raw[:6] in (MAGIC_PRIMARY, MAGIC_SECONDARY)


def peek_hdr_size(raw: bytes) -> int:
    """The hdr_size field of a candidate binary header (unvalidated beyond range)."""
    if len(raw) < 16:
        raise FormatError("truncated binary header")
    size = struct.unpack_from(">Q", raw, 8)[0]
    if size not in HDR_SIZES:
        raise FormatError(f"invalid hdr_size {size}")
    return size


def parse(area: bytes, expect_offset: int) -> tuple[BinaryHeader, bytes]:
    """Validate one header copy read from ``expect_offset``.

    ``area`` must hold the whole ``hdr_size`` bytes.  Returns the header and
    its JSON area; raises :class:`FormatError` when the copy is not valid.
    """
    if len(area) < BINARY_SIZE:
        raise FormatError("truncated binary header")
    (magic, version, hdr_size, seqid, label, csum_alg, salt, uuid, subsystem,
     hdr_offset, _pad, csum) = _STRUCT.unpack_from(area)
    primary = magic == MAGIC_PRIMARY
    if magic not in (MAGIC_PRIMARY, MAGIC_SECONDARY):
        raise FormatError("no LUKS2 magic")
    if version != VERSION:
        raise FormatError(f"unsupported LUKS version {version}")
    if hdr_size not in HDR_SIZES:
        raise FormatError(f"invalid hdr_size {hdr_size}")
    if hdr_offset != expect_offset:
        raise FormatError(f"header at {expect_offset} claims offset {hdr_offset}")
    if primary != (expect_offset == 0):
        raise FormatError("wrong magic for header position")
    if _cstr(csum_alg, "checksum_alg") != CSUM_ALG:
        raise FormatError(f"unsupported checksum algorithm {_cstr(csum_alg, 'checksum_alg')!r}")
    if len(area) < hdr_size:
        raise FormatError("truncated header area")
    json_area = bytes(area[BINARY_SIZE:hdr_size])
    if not hmac.compare_digest(csum[:32], _checksum(bytes(area[:BINARY_SIZE]), json_area)):
        raise FormatError("header checksum mismatch")
    header = BinaryHeader(primary=primary, hdr_size=hdr_size, seqid=seqid,
                          label=_cstr(label, "label"), uuid=_cstr(uuid, "uuid"),
                          subsystem=_cstr(subsystem, "subsystem"), salt=bytes(salt),
                          hdr_offset=hdr_offset)
    return header, json_area
