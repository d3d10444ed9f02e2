"""READ CAPACITY, GET LBA STATUS, UNMAP and WRITE SAME (SBC-3 logical block provisioning).

UNMAP deallocates (an encrypted volume then reads the blocks as zeroes).
WRITE SAME with the UNMAP bit deallocates only when the block to write is
zeroes and unmapped blocks read back as zeroes (LBPRZ: always on an
encrypted volume, see :attr:`Limits.plain_unmap_reads_zeroes` for a plain
one), so a read always returns what was written; otherwise it writes.  WRITE SAME of 0 blocks is refused (WSNZ=1 in VPD B0).
GET LBA STATUS reports holes of the backing file as deallocated, everything
else (a block device, a partly allocated block) as mapped.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .cdb import CDB10, CDB16, FIELD4, FIELD8
from .readwrite import CHUNK_BYTES
from .registry import CONTROL, command
from .sense import (GOOD_RESULT, PARAMETER_LIST_LENGTH, SHORT_DATA_OUT, Result, invalid_field,
                    invalid_parameter)
from .transfer import Transfer, send

if TYPE_CHECKING:
    from .lu import LogicalUnit

_CAPACITY16 = struct.Struct(">QIBBH16x")  # last LBA, block length, protection, exponents, LBPME/LBPRZ
_UNMAP_DESCRIPTOR = struct.Struct(">QI4x")
_LBA_STATUS = struct.Struct(">QIB3x")  # LBA, blocks, provisioning status (0 mapped, 1 deallocated)
_MAX_LBA_STATUS_DESCRIPTORS = 64  # each costs a seek or two in the backing file


def unmap_supported(lu: LogicalUnit) -> bool:
    return lu.limits.unmap_supported


@command(0x25, "READ CAPACITY(10)", *(0x00,) * 8, CONTROL)  # LBA and PMI are obsolete
def read_capacity10(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    lu.check_ready(locked_ok=True)
    backend = lu.backend
    last = min(max(backend.num_blocks - 1, 0), 0xFFFFFFFF)  # all ones: use READ CAPACITY(16)
    return send(xfer, struct.pack(">II", last, backend.block_size), 8)


@command(0x9E, "READ CAPACITY(16)", 0x1F, *(0x00,) * 8, *FIELD4, 0x00, CONTROL,
         service_action=0x10)
def read_capacity16(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    lu.check_ready(locked_ok=True)
    backend = lu.backend
    provisioning = 0
    if lu.limits.unmap_supported:
        provisioning = 0x8000 | (0x4000 if lu.lbprz else 0)  # LBPME, LBPRZ
    data = _CAPACITY16.pack(max(backend.num_blocks - 1, 0), backend.block_size, 0, 0, provisioning)
    return send(xfer, data, int.from_bytes(cdb[10:14], "big"))


@command(0x9E, "GET LBA STATUS", 0x1F, *FIELD8, *FIELD4, 0x00, CONTROL, service_action=0x12,
         available=unmap_supported)
def get_lba_status(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    """Extents from the starting LBA on, each all mapped or all deallocated."""
    lba = int.from_bytes(cdb[2:10], "big")
    allocation_length = int.from_bytes(cdb[10:14], "big")
    lu.check_ready()
    lu.check_range(lba, 1)
    end = lu.backend.num_blocks
    wanted = min(_MAX_LBA_STATUS_DESCRIPTORS, max(1, (allocation_length - 8) // 16))
    descriptors = []
    while lba < end and len(descriptors) < wanted:
        mapped, count = lu.provisioning_status(lba, min(end - lba, 0xFFFFFFFF))
        descriptors.append(_LBA_STATUS.pack(lba, count, 0 if mapped else 1))
        lba += count
    body = b"".join(descriptors)
    data = struct.pack(">I4x", 4 + len(body)) + body
    return send(xfer, data, allocation_length)


@command(0x42, "UNMAP", 0x01, 0x00, 0x00, 0x00, 0x00, 0x1F, 0xFF, 0xFF, CONTROL,
         available=unmap_supported)
def unmap(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    """Validate every block descriptor, then unmap each range."""
    if cdb[1] & 0x01:
        raise invalid_field(1, 0)  # ANCHOR: anchored LBAs are not supported
    length = min(int.from_bytes(cdb[7:9], "big"), xfer.length)
    lu.check_ready()
    if not length:
        return GOOD_RESULT
    if length < 8:
        return PARAMETER_LIST_LENGTH
    params = bytes(xfer.data_out(length))
    listed = int.from_bytes(params[2:4], "big")  # block descriptor data length
    count = min(listed, length - 8) // 16  # a partial descriptor is ignored
    limits = lu.limits
    if count > limits.max_unmap_descriptors:
        raise invalid_parameter(2)
    ranges = [_UNMAP_DESCRIPTOR.unpack_from(params, 8 + 16 * i) for i in range(count)]
    if sum(n for _, n in ranges) > limits.max_unmap_blocks:
        raise invalid_parameter(8)
    for lba, n in ranges:
        lu.check_range(lba, n)
    for lba, n in ranges:
        with lu.locks.hold(lba, n):
            lu.unmap(lba, n)
    return GOOD_RESULT


def _write_same(lu: LogicalUnit, xfer: Transfer, flags: int, lba: int, count: int,
                length_at: int, ndob: bool) -> Result:
    if flags & 0xE0:
        raise invalid_field(1, 7)  # WRPROTECT
    if flags & 0x10:
        raise invalid_field(1, 4)  # ANCHOR
    if flags & 0x06:
        raise invalid_field(1, 2 if flags & 0x04 else 1)  # PBDATA, LBDATA
    limit = lu.limits.max_write_same_blocks
    if not count or (limit and count > limit):
        raise invalid_field(length_at)
    lu.check_ready()
    lu.check_range(lba, count)
    block_size = lu.backend.block_size
    if ndob:
        block = bytes(block_size)
    elif block_size > xfer.length:
        return SHORT_DATA_OUT
    else:
        block = bytes(xfer.data_out(block_size))
    if flags & 0x08 and lu.limits.unmap_supported and lu.lbprz and not any(block):
        with lu.locks.hold(lba, count):
            lu.unmap(lba, count)
        return GOOD_RESULT
    per_chunk = max(1, CHUNK_BYTES // block_size)
    pattern = memoryview(block * min(count, per_chunk))
    for start in range(lba, lba + count, per_chunk):
        n = min(per_chunk, lba + count - start)
        with lu.locks.hold(start, n):
            lu.write(start, pattern[: n * block_size])
    return GOOD_RESULT


@command(0x41, "WRITE SAME(10)", 0xFE, *FIELD4, 0x1F, 0xFF, 0xFF, CONTROL)
def write_same10(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    return _write_same(lu, xfer, *CDB10.unpack_from(cdb), 7, False)


@command(0x93, "WRITE SAME(16)", 0xFF, *FIELD8, *FIELD4, 0x1F, CONTROL)
def write_same16(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    flags, lba, count = CDB16.unpack_from(cdb)
    return _write_same(lu, xfer, flags & 0xFE, lba, count, 10, bool(flags & 0x01))
