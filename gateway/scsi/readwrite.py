"""READ, WRITE, VERIFY, COMPARE AND WRITE, SYNCHRONIZE CACHE and PRE-FETCH (SBC-3).

A data buffer shorter than the CDB's transfer length gets as much of a READ
as fits (``data_in_len`` says how much; the kernel reports the residual);
a WRITE it cannot cover is refused with ILLEGAL REQUEST 0E/03 (as LIO does)
and nothing is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .cdb import CDB10, CDB12, CDB16, FIELD4, FIELD8, lba_length6
from .registry import CONTROL, command
from .sense import (GOOD, GOOD_RESULT, MISCOMPARE, SHORT_DATA_OUT, CheckCondition, Result, check,
                    invalid_field)
from .transfer import Buffer, Transfer

if TYPE_CHECKING:
    from .batch import ReadBatch
    from .lu import LogicalUnit

#: large VERIFY and WRITE SAME go to the volume in pieces of this size
CHUNK_BYTES = 1 << 20

_RW10 = (0xF8, *FIELD4, 0x1F, 0xFF, 0xFF, CONTROL)  # (RD|WR)PROTECT, DPO, FUA; group
_RW12 = (0xF8, *FIELD4, *FIELD4, 0x1F, CONTROL)
_RW16 = (0xF8, *FIELD8, *FIELD4, 0x1F, CONTROL)


def first_difference(a: Buffer, b: Buffer) -> int | None:
    """Offset of the first byte where equally long ``a`` and ``b`` differ."""
    if a == b:
        return None
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    return int(diff[0])


def miscompare(offset: int) -> CheckCondition:
    """MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION (1D/00) at ``offset``."""
    return CheckCondition(check(MISCOMPARE, 0x1D, 0x00, information=offset))


_GOOD_IN: dict[int, Result] = {}  # GOOD with n bytes of data-in, for n up to 1 MiB


def _good_in(size: int) -> Result:
    """GOOD with ``size`` bytes of data-in (the usual sizes built once: every READ
    returns one)."""
    result = _GOOD_IN.get(size)
    if result is None:
        result = Result(GOOD, b"", size)
        if size <= CHUNK_BYTES:
            _GOOD_IN[size] = result
    return result


def _check_length(lu: LogicalUnit, count: int, length_at: int) -> None:
    limit = lu.limits.max_transfer_blocks
    if limit and count > limit:
        raise invalid_field(length_at)


def _read(lu: LogicalUnit, xfer: Transfer, flags: int, lba: int, count: int,
          length_at: int, nowait: bool | ReadBatch = False) -> Result:
    if flags & 0xE0:
        raise invalid_field(1, 7)  # RDPROTECT: no protection information
    _check_length(lu, count, length_at)
    lu.check_ready()
    lu.check_range(lba, count)
    if not count:
        return GOOD_RESULT
    block_size = lu.backend.block_size
    size = count * block_size
    if size <= xfer.length:
        view = xfer.in_view(size)
        if view is not None:
            lu.readinto(lba, view, nowait)  # a ReadBatch queues it (see .batch)
            return _good_in(size)
        buf = bytearray(size)
    else:  # short buffer: fill it, no more
        size = xfer.length
        buf = bytearray(-(-size // block_size) * block_size)
    lu.readinto(lba, buf, bool(nowait))  # read now: it is copied out below
    xfer.data_in(buf)
    return Result(GOOD, b"", size)


def _write(lu: LogicalUnit, xfer: Transfer, flags: int, lba: int, count: int,
           length_at: int) -> Result:
    if flags & 0xE0:
        raise invalid_field(1, 7)  # WRPROTECT: no protection information
    _check_length(lu, count, length_at)
    lu.check_ready()
    lu.check_range(lba, count)
    if not count:
        return GOOD_RESULT
    size = count * lu.backend.block_size
    if size > xfer.length:
        return SHORT_DATA_OUT
    data = xfer.data_out(size)
    span = lu.locks.acquire(lba, count)  # not ``with hold()``: this is every WRITE's path
    try:
        lu.write(lba, data, bool(flags & 0x08))
    finally:
        lu.locks.release(span)
    return GOOD_RESULT


@command(0x08, "READ(6)", 0x1F, 0xFF, 0xFF, 0xFF, CONTROL, nowait=True)
def read6(lu: LogicalUnit, cdb: bytes, xfer: Transfer, nowait: bool | ReadBatch = False) -> Result:
    return _read(lu, xfer, 0, *lba_length6(cdb), 4, nowait)


@command(0x0A, "WRITE(6)", 0x1F, 0xFF, 0xFF, 0xFF, CONTROL)
def write6(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    return _write(lu, xfer, 0, *lba_length6(cdb), 4)


@command(0x28, "READ(10)", *_RW10, nowait=True)
def read10(lu: LogicalUnit, cdb: bytes, xfer: Transfer, nowait: bool | ReadBatch = False) -> Result:
    return _read(lu, xfer, *CDB10.unpack_from(cdb), 7, nowait)


@command(0x2A, "WRITE(10)", *_RW10)
def write10(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    return _write(lu, xfer, *CDB10.unpack_from(cdb), 7)


@command(0xA8, "READ(12)", *_RW12, nowait=True)
def read12(lu: LogicalUnit, cdb: bytes, xfer: Transfer, nowait: bool | ReadBatch = False) -> Result:
    return _read(lu, xfer, *CDB12.unpack_from(cdb), 6, nowait)


@command(0xAA, "WRITE(12)", *_RW12)
def write12(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    return _write(lu, xfer, *CDB12.unpack_from(cdb), 6)


@command(0x88, "READ(16)", *_RW16, nowait=True)
def read16(lu: LogicalUnit, cdb: bytes, xfer: Transfer, nowait: bool | ReadBatch = False) -> Result:
    return _read(lu, xfer, *CDB16.unpack_from(cdb), 10, nowait)


@command(0x8A, "WRITE(16)", *_RW16)
def write16(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    return _write(lu, xfer, *CDB16.unpack_from(cdb), 10)


def _verify(lu: LogicalUnit, xfer: Transfer, flags: int, lba: int, count: int,
            length_at: int) -> Result:
    """BYTCHK 0: read and decrypt; 1: compare with the data-out; 3: compare
    every block with the one block of data-out."""
    if flags & 0xE0:
        raise invalid_field(1, 7)  # VRPROTECT
    bytchk = (flags >> 1) & 0x03
    if bytchk == 2:
        raise invalid_field(1, 2)
    if bytchk == 1:
        _check_length(lu, count, length_at)
    lu.check_ready()
    lu.check_range(lba, count)
    if not count:
        return GOOD_RESULT
    block_size = lu.backend.block_size
    per_chunk = max(1, CHUNK_BYTES // block_size)
    expected: memoryview | None = None
    if bytchk:
        size = block_size * (count if bytchk == 1 else 1)
        if size > xfer.length:
            return SHORT_DATA_OUT
        expected = xfer.data_out(size)
        if bytchk == 3:
            expected = memoryview(bytes(expected) * min(count, per_chunk))
    buf = bytearray(min(count, per_chunk) * block_size)
    for start in range(0, count, per_chunk):
        n = min(per_chunk, count - start)
        view = memoryview(buf)[: n * block_size]
        lu.readinto(lba + start, view)
        if expected is not None:
            offset = start * block_size
            want = expected[offset : offset + n * block_size] if bytchk == 1 else expected[: n * block_size]
            diff = first_difference(view, want)
            if diff is not None:
                raise miscompare(offset + diff)
    return GOOD_RESULT


@command(0x2F, "VERIFY(10)", 0xF6, *FIELD4, 0x1F, 0xFF, 0xFF, CONTROL)
def verify10(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    return _verify(lu, xfer, *CDB10.unpack_from(cdb), 7)


@command(0x8F, "VERIFY(16)", 0xF6, *FIELD8, *FIELD4, 0x1F, CONTROL)
def verify16(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    return _verify(lu, xfer, *CDB16.unpack_from(cdb), 10)


@command(0x89, "COMPARE AND WRITE", 0xF8, *FIELD8, 0x00, 0x00, 0x00, 0xFF, 0x1F, CONTROL)
def compare_and_write(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    """Compare, then write, atomically with respect to every other modification
    of the range: the data-out holds the blocks to compare, then those to write."""
    flags, lba, count = cdb[1], int.from_bytes(cdb[2:10], "big"), cdb[13]
    if flags & 0xE0:
        raise invalid_field(1, 7)
    if count > lu.limits.max_compare_write_blocks:
        raise invalid_field(13)
    lu.check_ready()
    lu.check_range(lba, count)
    if not count:
        return GOOD_RESULT
    size = count * lu.backend.block_size
    if 2 * size > xfer.length:
        return SHORT_DATA_OUT
    data = xfer.data_out(2 * size)
    current = bytearray(size)
    with lu.locks.hold(lba, count):
        lu.readinto(lba, current)
        diff = first_difference(current, data[:size])
        if diff is not None:
            raise miscompare(diff)
        lu.write(lba, data[size:], bool(flags & 0x08))
    return GOOD_RESULT


def _synchronize(lu: LogicalUnit, lba: int, count: int) -> Result:
    """Flush everything (the range only bounds-checks: 0 blocks means to the end)."""
    lu.check_ready()
    lu.check_range(lba, count)
    lu.flush()
    return GOOD_RESULT


@command(0x35, "SYNCHRONIZE CACHE(10)", 0x02, *FIELD4, 0x1F, 0xFF, 0xFF, CONTROL)
def synchronize_cache10(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    _, lba, count = CDB10.unpack_from(cdb)
    return _synchronize(lu, lba, count)


@command(0x91, "SYNCHRONIZE CACHE(16)", 0x02, *FIELD8, *FIELD4, 0x1F, CONTROL)
def synchronize_cache16(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    _, lba, count = CDB16.unpack_from(cdb)
    return _synchronize(lu, lba, count)


def _prefetch(lu: LogicalUnit, lba: int, count: int) -> Result:
    """GOOD: there is no cache to load (CONDITION MET would claim the blocks are in it)."""
    lu.check_ready()
    lu.check_range(lba, count)
    return GOOD_RESULT


@command(0x34, "PRE-FETCH(10)", 0x02, *FIELD4, 0x1F, 0xFF, 0xFF, CONTROL)
def prefetch10(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    _, lba, count = CDB10.unpack_from(cdb)
    return _prefetch(lu, lba, count)


@command(0x90, "PRE-FETCH(16)", 0x02, *FIELD8, *FIELD4, 0x1F, CONTROL)
def prefetch16(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    _, lba, count = CDB16.unpack_from(cdb)
    return _prefetch(lu, lba, count)
