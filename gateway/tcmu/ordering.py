"""Which commands must wait for which: overlapping media access runs in arrival order.

The kernel does not order overlapping commands for the handler, and the
workers run commands concurrently, so a command that overlaps an earlier
one still in flight (or still waiting) waits for it whenever either writes.
UNMAP (its ranges are in the parameter list) and SYNCHRONIZE CACHE act as
barriers; commands that touch no media never wait.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..scsi.cdb import CDB10, CDB12, CDB16, lba_length6

_WHOLE = (0, 1 << 64)


@dataclass(frozen=True)
class Access:
    """The LBA span a command touches, and whether it changes it."""

    start: int
    end: int  # exclusive
    writes: bool

    def conflicts(self, other: Access) -> bool:
        return (self.writes or other.writes) and self.start < other.end \
            and other.start < self.end


def _rw6(cdb: bytes) -> tuple[int, int]:
    return lba_length6(cdb)


def _rw10(cdb: bytes) -> tuple[int, int]:
    return CDB10.unpack_from(cdb)[1:]


def _rw12(cdb: bytes) -> tuple[int, int]:
    return CDB12.unpack_from(cdb)[1:]


def _rw16(cdb: bytes) -> tuple[int, int]:
    return CDB16.unpack_from(cdb)[1:]


def _caw(cdb: bytes) -> tuple[int, int]:
    return struct.unpack_from(">Q", cdb, 2)[0], cdb[13]


# opcode -> (parser, writes); None parser = barrier over the whole LUN
_MEDIA = {
    0x08: (_rw6, False), 0x28: (_rw10, False), 0xA8: (_rw12, False), 0x88: (_rw16, False),
    0x0A: (_rw6, True), 0x2A: (_rw10, True), 0xAA: (_rw12, True), 0x8A: (_rw16, True),
    0x2E: (_rw10, True), 0x8E: (_rw16, True),  # WRITE AND VERIFY
    0x2F: (_rw10, False), 0x8F: (_rw16, False),  # VERIFY
    0x41: (_rw10, True), 0x93: (_rw16, True),  # WRITE SAME
    0x89: (_caw, True),  # COMPARE AND WRITE
    0x42: (None, True),  # UNMAP
    0x35: (None, True), 0x91: (None, True),  # SYNCHRONIZE CACHE
}


def access(cdb: bytes) -> Access | None:
    """The span ``cdb`` touches, or None for a command that touches no media."""
    if not cdb or cdb[0] not in _MEDIA:
        return None
    parse, writes = _MEDIA[cdb[0]]
    if parse is None:
        return Access(*_WHOLE, writes)
    try:
        lba, count = parse(cdb)
    except (struct.error, IndexError):
        return Access(*_WHOLE, writes)  # malformed: order it conservatively
    if cdb[0] in (0x41, 0x93) and count == 0:  # WRITE SAME to the end of the LUN
        return Access(lba, _WHOLE[1], writes)
    return Access(lba, lba + max(count, 1), writes)
