"""MODE SENSE(6)/(10): the caching and control mode pages (SPC-4, SBC-3).

MODE SELECT is not supported (ILLEGAL REQUEST 20/00): no mode parameter is
changeable (the changeable values are all zeroes) and none can be saved
(page control 3 gets 39/00 SAVING PARAMETERS NOT SUPPORTED).  WCE reflects
:attr:`Limits.write_cache`, which the gateway, not the initiator, decides.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .registry import CONTROL, command
from .sense import ILLEGAL_REQUEST, CheckCondition, Result, check, invalid_field
from .transfer import Transfer, send

if TYPE_CHECKING:
    from .lu import LogicalUnit

CACHING, CONTROL_PAGE, ALL_PAGES = 0x08, 0x0A, 0x3F
_CHANGEABLE, _SAVED = 1, 3
_DPOFUA = 0x10  # device-specific parameter: DPO and FUA are supported


def caching_page(lu: LogicalUnit, changeable: bool) -> bytes:
    page = bytearray(20)
    page[0:2] = CACHING, 0x12
    if lu.limits.write_cache and not changeable:
        page[2] = 0x04  # WCE
    return bytes(page)


def control_page(lu: LogicalUnit, changeable: bool) -> bytes:
    page = bytearray(12)
    page[0:2] = CONTROL_PAGE, 0x0A
    if not changeable:
        page[2] = 0x02  # GLTSD: no log parameters are saved
        page[3] = 0x10  # unrestricted reordering: commands run concurrently
    return bytes(page)


_PAGES = {CACHING: caching_page, CONTROL_PAGE: control_page}


def _pages(lu: LogicalUnit, cdb: bytes) -> bytes:
    control, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if control == _SAVED:
        raise CheckCondition(check(ILLEGAL_REQUEST, 0x39, 0x00, field=(2, 7)))
    if subpage not in (0x00, 0xFF):
        raise invalid_field(3)  # no subpages
    changeable = control == _CHANGEABLE
    if code == ALL_PAGES:
        return b"".join(build(lu, changeable) for build in _PAGES.values())
    build = _PAGES.get(code)
    if build is None:
        raise invalid_field(2, 5)
    return build(lu, changeable)


def _block_descriptor(lu: LogicalUnit, long_lba: bool) -> bytes:
    blocks, block_size = lu.backend.num_blocks, lu.backend.block_size
    if long_lba:
        return struct.pack(">Q4xI", blocks, block_size)
    return struct.pack(">IxBH", min(blocks, 0xFFFFFFFF), block_size >> 16, block_size & 0xFFFF)


@command(0x1A, "MODE SENSE(6)", 0x08, 0xFF, 0xFF, 0xFF, CONTROL)
def mode_sense6(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    pages = _pages(lu, cdb)
    blocks = b"" if cdb[1] & 0x08 else _block_descriptor(lu, False)
    header = bytes((3 + len(blocks) + len(pages), 0x00, _DPOFUA, len(blocks)))
    return send(xfer, header + blocks + pages, cdb[4])


@command(0x5A, "MODE SENSE(10)", 0x18, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0xFF, 0xFF, CONTROL)
def mode_sense10(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    pages = _pages(lu, cdb)
    long_lba = bool(cdb[1] & 0x10)
    blocks = b"" if cdb[1] & 0x08 else _block_descriptor(lu, long_lba)
    header = struct.pack(">HBBB1xH", 6 + len(blocks) + len(pages), 0x00, _DPOFUA,
                         0x01 if blocks and long_lba else 0x00, len(blocks))
    return send(xfer, header + blocks + pages, int.from_bytes(cdb[7:9], "big"))
