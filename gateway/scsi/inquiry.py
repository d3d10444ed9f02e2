"""INQUIRY: standard data and the vital product data pages (SPC-4, SBC-3)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from .device import Identity
from .registry import CONTROL, command
from .sense import Result, invalid_field
from .transfer import Transfer, send

if TYPE_CHECKING:
    from .lu import LogicalUnit

#: version descriptors: SAM-5, SPC-4, SBC-3
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)
_STANDARD_LENGTH = 74  # through the eighth version descriptor


def standard_inquiry(identity: Identity) -> bytes:
    """Standard INQUIRY data: a direct-access block device, SPC-4, CMDQUE."""
    data = bytearray(_STANDARD_LENGTH)
    data[2] = 0x06  # SPC-4
    data[3] = 0x02  # response data format 2
    data[4] = _STANDARD_LENGTH - 5
    data[7] = 0x02  # CMDQUE; TPGS (byte 5) stays 0: no ALUA
    data[8:16] = identity.vendor.encode().ljust(8)
    data[16:32] = identity.product.encode().ljust(16)
    data[32:36] = identity.revision.encode().ljust(4)
    struct.pack_into(">HHH", data, 58, *VERSION_DESCRIPTORS)
    return bytes(data)


def _page(code: int, body: bytes | bytearray) -> bytes:
    return bytes((0x00, code)) + len(body).to_bytes(2, "big") + body


def _designator(code_set: int, kind: int, value: bytes) -> bytes:
    """A designation descriptor associated with the logical unit."""
    return bytes((code_set, kind, 0x00, len(value))) + value


def supported_pages(lu: LogicalUnit) -> bytes:
    return _page(0x00, bytes(VPD_PAGES))


def unit_serial_number(lu: LogicalUnit) -> bytes:
    return _page(0x80, lu.identity.serial.encode())


def device_identification(lu: LogicalUnit) -> bytes:
    """NAA (when there is a serial), T10 vendor id and the optional vendor-specific id."""
    identity = lu.identity
    body = b""
    if identity.naa is not None:
        body += _designator(0x01, 0x03, identity.naa.to_bytes(16, "big"))  # binary, NAA
    t10 = identity.vendor.encode().ljust(8) + (identity.serial or identity.product).encode()
    body += _designator(0x02, 0x01, t10)  # ASCII, T10 vendor ID
    if identity.device_id is not None:
        body += _designator(0x01, 0x00, identity.device_id)  # binary, vendor specific
    return _page(0x83, body)


def block_limits(lu: LogicalUnit) -> bytes:
    limits = lu.limits
    body = bytearray(0x3C)
    body[0] = 0x01  # WSNZ: WRITE SAME of 0 blocks is refused
    body[1] = limits.max_compare_write_blocks
    struct.pack_into(">II", body, 4, limits.max_transfer_blocks, limits.optimal_transfer_blocks)
    if limits.unmap_supported:
        granularity = max(1, 4096 // lu.backend.block_size)  # a page: what a hole punch frees
        struct.pack_into(">III", body, 16, limits.max_unmap_blocks, limits.max_unmap_descriptors,
                         granularity)
    struct.pack_into(">Q", body, 32, limits.max_write_same_blocks)
    return _page(0xB0, body)


def block_device_characteristics(lu: LogicalUnit) -> bytes:
    return _page(0xB1, b"\x00\x01" + bytes(0x3A))  # non-rotating medium


def logical_block_provisioning(lu: LogicalUnit) -> bytes:
    body = bytearray(4)
    if lu.limits.unmap_supported:
        body[1] = 0xE0 | (0x04 if lu.lbprz else 0)  # LBPU, LBPWS, LBPWS10, LBPRZ
        body[2] = 0x02  # thin provisioned
    return _page(0xB2, body)


VPD_PAGES: dict[int, Callable[[LogicalUnit], bytes]] = {
    0x00: supported_pages,
    0x80: unit_serial_number,
    0x83: device_identification,
    0xB0: block_limits,
    0xB1: block_device_characteristics,
    0xB2: logical_block_provisioning,
}


@command(0x12, "INQUIRY", 0x03, 0xFF, 0xFF, 0xFF, CONTROL, unit_attention=False)
def inquiry(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    if cdb[1] & 0x02:
        raise invalid_field(1, 1)  # CmdDt (obsolete)
    page = cdb[2]
    if not cdb[1] & 0x01:
        if page:
            raise invalid_field(2)
        data = standard_inquiry(lu.identity)
    else:
        build = VPD_PAGES.get(page)
        if build is None:
            raise invalid_field(2)
        data = build(lu)
    return send(xfer, data, int.from_bytes(cdb[3:5], "big"))
