"""REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN, service action 0x0C), from the registry."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .cdb import FIELD4
from .registry import CONTROL, REGISTRY, Command, command
from .transfer import Transfer, send
from .sense import Result, invalid_field

if TYPE_CHECKING:
    from .lu import LogicalUnit

#: command timeouts descriptor: nominal time not specified, 30 s recommended (TCMU's cmd_time_out)
TIMEOUTS = struct.pack(">HxxII", 0x0A, 0, 30)
_SUPPORTED, _NOT_SUPPORTED = 0x03, 0x01


def _descriptor(cmd: Command, rctd: bool) -> bytes:
    flags = (0x02 if rctd else 0) | (0x01 if cmd.service_action is not None else 0)
    data = struct.pack(">BxHxBH", cmd.opcode, cmd.service_action or 0, flags, cmd.cdb_length)
    return data + TIMEOUTS if rctd else data


@command(0xA3, "REPORT SUPPORTED OPERATION CODES", 0x1F, 0x87, 0xFF, 0xFF, 0xFF, *FIELD4, 0x00,
         CONTROL, service_action=0x0C)
def report_supported_operation_codes(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    rctd, options = bool(cdb[2] & 0x80), cdb[2] & 0x07
    opcode, action = cdb[3], int.from_bytes(cdb[4:6], "big")
    allocation = int.from_bytes(cdb[6:10], "big")
    if options == 0:
        body = b"".join(_descriptor(cmd, rctd) for cmd in REGISTRY if cmd.supported_by(lu))
        return send(xfer, len(body).to_bytes(4, "big") + body, allocation)
    if options == 1:
        if REGISTRY.has_service_actions(opcode):
            raise invalid_field(3)
        cmd = REGISTRY.get(opcode)
    elif options == 2:
        if REGISTRY.get(opcode) is not None:  # an opcode without service actions
            raise invalid_field(3)
        cmd = REGISTRY.get(opcode, action)
    else:
        raise invalid_field(2, 2)
    if cmd is None or not cmd.supported_by(lu):
        return send(xfer, bytes((0x00, _NOT_SUPPORTED, 0x00, 0x00)), allocation)
    data = bytes((0x00, (0x80 if rctd else 0) | _SUPPORTED)) + cmd.cdb_length.to_bytes(2, "big")
    data += cmd.usage + (TIMEOUTS if rctd else b"")
    return send(xfer, data, allocation)
