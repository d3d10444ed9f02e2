"""Reading and writing the two LUKS2 header copies on a block device.

Sans-IO in the sense that the only I/O is through a small device object
(``size``, ``pread``, ``pwrite``, ``flush``); any backstore or an in-memory
buffer will do.

Write order, as cryptsetup: seqid + 1, then for the primary and then the
secondary copy: binary header with a zero checksum (the copy is now invalid),
JSON area, binary header with its checksum, flush.  A crash therefore leaves
at least one valid copy, and the reader takes the valid copy with the higher
seqid and rewrites the other one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from . import binary
from .errors import FormatError, HeaderCorruptError, NoHeaderError
from .metadata import Metadata, decode


class Device(Protocol):
    """What the format layer needs of a block device."""

    @property
    def size(self) -> int: ...

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class Header:
    """A LUKS2 header: the binary fields shared by both copies and the metadata."""

    hdr_size: int
    seqid: int
    uuid: str
    label: str
    subsystem: str
    salts: tuple[bytes, bytes]
    metadata: Metadata

    def with_metadata(self, metadata: Metadata) -> Header:
        return replace(self, metadata=metadata)


@dataclass
class ReadResult:
    """The chosen header, and the state of each copy."""

    header: Header
    primary_ok: bool  # valid and current
    secondary_ok: bool
    problems: list[str] = field(default_factory=list)

    @property
    def needs_repair(self) -> bool:
        return not (self.primary_ok and self.secondary_ok)


@dataclass
class _Copy:
    offset: int
    binary: binary.BinaryHeader
    metadata: Metadata


def _read_copy(dev: Device, offset: int, problems: list[str]) -> _Copy | None:
    name = "primary" if offset == 0 else f"secondary at {offset}"
    if dev.size < offset + binary.BINARY_SIZE:
        return None
    head = dev.pread(binary.BINARY_SIZE, offset)
    if not binary.has_magic(head):
        if offset == 0:
            problems.append("primary header: no LUKS2 signature")
        return None
    try:
        hdr_size = binary.peek_hdr_size(head)
        if dev.size < offset + hdr_size:
            raise FormatError("header area runs past the end of the device")
        area = head + dev.pread(hdr_size - binary.BINARY_SIZE, offset + binary.BINARY_SIZE)
        bh, json_area = binary.parse(area, offset)
        if offset and bh.hdr_size != offset:
            raise FormatError(f"secondary header at {offset} has hdr_size {bh.hdr_size}")
        return _Copy(offset, bh, decode(json_area, bh.hdr_size))
    except FormatError as exc:
        problems.append(f"{name} header: {exc}")
        return None


def probe(dev: Device) -> bool:
    """True if any LUKS signature is present (valid or not)."""
    for offset in (0, *binary.HDR_SIZES):
        if dev.size >= offset + 6 and binary.has_magic(dev.pread(6, offset)):
            return True
    return False


def read(dev: Device) -> ReadResult:
    """Read both copies and choose one, as cryptsetup does.

    Raises :class:`NoHeaderError` when there is no LUKS signature at all and
    :class:`HeaderCorruptError` when no copy is valid.
    """
    problems: list[str] = []
    primary = _read_copy(dev, 0, problems)
    secondary = None
    if primary is not None:
        secondary = _read_copy(dev, primary.binary.hdr_size, problems)
        if secondary is None and not any(p.startswith("secondary") for p in problems):
            problems.append(f"secondary header at {primary.binary.hdr_size}: missing")
        if secondary is not None and secondary.binary.uuid != primary.binary.uuid:
            problems.append("secondary header belongs to another device (UUID differs)")
            secondary = None
    else:
        for offset in binary.HDR_SIZES:  # the primary is unusable: scan
            secondary = _read_copy(dev, offset, problems)
            if secondary is not None:
                break
    if primary is None and secondary is None:
        if probe(dev):
            raise HeaderCorruptError("no valid LUKS2 header copy: " + "; ".join(problems))
        raise NoHeaderError("no LUKS2 header on this device")
    if primary is not None and secondary is not None:
        if primary.binary.seqid != secondary.binary.seqid:
            problems.append(f"header copies differ (seqid {primary.binary.seqid} vs "
                            f"{secondary.binary.seqid})")
        best = secondary if secondary.binary.seqid > primary.binary.seqid else primary
    else:
        best = primary or secondary
    assert best is not None
    salts = (primary.binary.salt if primary else best.binary.salt,
             secondary.binary.salt if secondary else _other_salt(best.binary.salt))
    header = Header(hdr_size=best.binary.hdr_size, seqid=best.binary.seqid, uuid=best.binary.uuid,
                    label=best.binary.label, subsystem=best.binary.subsystem, salts=salts,
                    metadata=best.metadata)
    return ReadResult(header, primary is not None and primary.binary.seqid == best.binary.seqid,
                      secondary is not None and secondary.binary.seqid == best.binary.seqid,
                      problems)


def _other_salt(salt: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in salt)


def _packed(header: Header, primary: bool, json_area: bytes) -> tuple[int, bytes]:
    offset = 0 if primary else header.hdr_size
    bh = binary.BinaryHeader(primary=primary, hdr_size=header.hdr_size, seqid=header.seqid,
                             label=header.label, uuid=header.uuid, subsystem=header.subsystem,
                             salt=header.salts[0 if primary else 1], hdr_offset=offset)
    return offset, bh.pack(json_area)


def _write_copy(dev: Device, header: Header, primary: bool, json_area: bytes) -> None:
    offset, packed = _packed(header, primary, json_area)
    dev.pwrite(packed[:binary.BINARY_SIZE].replace(packed[448:512], bytes(64), 1), offset)
    dev.pwrite(json_area, offset + binary.BINARY_SIZE)
    dev.pwrite(packed[:binary.BINARY_SIZE], offset)
    dev.flush()


def write(dev: Device, header: Header, *, fresh: bool = False) -> Header:
    """Commit ``header`` (its seqid is incremented) to both copies, primary first.

    ``fresh``: the device has no LUKS signature yet (a new eVLU).  Both copies
    are then written whole but without their magic, and the magics last
    (primary first), so a crash leaves either no signature or a valid header.
    """
    new = replace(header, seqid=header.seqid + 1)
    json_area = new.metadata.encode()
    if dev.size < 2 * new.hdr_size:
        raise FormatError("device too small for the LUKS2 header")
    if not fresh:
        _write_copy(dev, new, True, json_area)
        _write_copy(dev, new, False, json_area)
        return new
    copies = [_packed(new, primary, json_area) for primary in (True, False)]
    for offset, packed in copies:
        dev.pwrite(bytes(6) + packed[6:], offset)
    dev.flush()
    for offset, packed in copies:
        dev.pwrite(packed[:6], offset)
        dev.flush()
    return new


def repair(dev: Device, result: ReadResult) -> None:
    """Rewrite the invalid or stale copy from the chosen one (same seqid).

    Only the bad copy is written, so a crash during repair still leaves the
    good one."""
    if not result.needs_repair:
        return
    json_area = result.header.metadata.encode()
    for primary, ok in ((True, result.primary_ok), (False, result.secondary_ok)):
        if not ok:
            _write_copy(dev, result.header, primary, json_area)
    for offset in binary.HDR_SIZES:  # stale secondaries elsewhere would confuse a scan
        if offset != result.header.hdr_size and dev.size >= offset + 6 \
                and dev.pread(6, offset) == binary.MAGIC_SECONDARY:
            dev.pwrite(bytes(binary.BINARY_SIZE), offset)
    dev.flush()


def erase(dev: Device) -> None:
    """Remove every LUKS signature: primary first, so a crash leaves the old
    header recoverable from its secondary copy or no header at all."""
    for offset in (0, *binary.HDR_SIZES):
        if dev.size >= offset + binary.BINARY_SIZE and binary.has_magic(dev.pread(6, offset)):
            dev.pwrite(bytes(binary.BINARY_SIZE), offset)
            dev.flush()
