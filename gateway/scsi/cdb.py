"""CDB layouts shared by several commands, and their CDB usage masks."""

from __future__ import annotations

import struct

#: (flags byte 1, LBA, transfer length) of 10-, 12- and 16-byte block CDBs
CDB10 = struct.Struct(">xBIxH")
CDB12 = struct.Struct(">xBIIxx")
CDB16 = struct.Struct(">xBQIxx")

#: CDB usage masks of 4- and 8-byte fields
FIELD4 = (0xFF,) * 4
FIELD8 = (0xFF,) * 8


def lba_length6(cdb: bytes) -> tuple[int, int]:
    """LBA and transfer length of a READ(6)/WRITE(6) CDB (0 blocks means 256)."""
    return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256
