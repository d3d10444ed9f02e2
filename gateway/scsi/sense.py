"""SCSI status codes, fixed-format sense data and the result of a command."""

from __future__ import annotations

from dataclasses import dataclass

# status
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
TASK_SET_FULL = 0x28

# sense keys
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
MISCOMPARE = 0xE

SENSE_LENGTH = 18


def fixed_sense(key: int, asc: int, ascq: int, *, information: int | None = None,
                field: tuple[int, int | None] | None = None, in_cdb: bool = True) -> bytes:
    """18 bytes of fixed-format sense data (response code 0x70).

    ``information`` sets the INFORMATION field and the VALID bit; ``field``
    is a (byte, bit or None) pointer into the CDB (``in_cdb``) or the
    parameter list, reported in the sense-key specific bytes with SKSV set.
    """
    sense = bytearray(SENSE_LENGTH)
    sense[0] = 0x70
    sense[2] = key
    if information is not None:
        sense[0] |= 0x80
        sense[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    sense[7] = SENSE_LENGTH - 8
    sense[12], sense[13] = asc, ascq
    if field is not None:
        byte, bit = field
        sense[15] = 0x80 | (0x40 if in_cdb else 0) | (0x08 | bit if bit is not None else 0)
        sense[16:18] = byte.to_bytes(2, "big")
    return bytes(sense)


@dataclass(frozen=True, slots=True)
class Result:
    """What a command produced: its status, sense data when CHECK CONDITION,
    and how many bytes of data-in it returned (for READ_LEN and residuals)."""

    status: int
    sense: bytes = b""
    data_in_len: int = 0


def check(key: int, asc: int, ascq: int = 0, **fields: object) -> Result:
    """A CHECK CONDITION result; ``fields`` as for :func:`fixed_sense`."""
    return Result(CHECK_CONDITION, fixed_sense(key, asc, ascq, **fields))  # type: ignore[arg-type]


class CheckCondition(Exception):
    """Raised by command handlers to end a command with a CHECK CONDITION result."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"CHECK CONDITION {result.sense[2:3].hex()}/{result.sense[12:14].hex()}")
        self.result = result


def invalid_field(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST, INVALID FIELD IN CDB (24/00) pointing at ``byte``/``bit``."""
    return CheckCondition(check(ILLEGAL_REQUEST, 0x24, 0x00, field=(byte, bit)))


def invalid_parameter(byte: int, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26/00) pointing at ``byte``/``bit``."""
    return CheckCondition(check(ILLEGAL_REQUEST, 0x26, 0x00, field=(byte, bit), in_cdb=False))


GOOD_RESULT = Result(GOOD)
INVALID_OPCODE = check(ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = check(ILLEGAL_REQUEST, 0x21, 0x00)
#: the data buffer is shorter than the CDB says (what LIO reports for it)
SHORT_DATA_OUT = check(ILLEGAL_REQUEST, 0x0E, 0x03)  # INVALID FIELD IN COMMAND INFORMATION UNIT
PARAMETER_LIST_LENGTH = check(ILLEGAL_REQUEST, 0x1A, 0x00)
HARDWARE_FAILURE = check(HARDWARE_ERROR, 0x44, 0x00)  # INTERNAL TARGET FAILURE
READ_ERROR = check(MEDIUM_ERROR, 0x11, 0x00)  # UNRECOVERED READ ERROR
WRITE_ERROR = check(MEDIUM_ERROR, 0x0C, 0x00)  # WRITE ERROR
