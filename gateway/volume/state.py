"""Volume states (DESIGN.md, the seed's Table 1), transitions and I/O errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    UNENCRYPTED = "UNENCRYPTED"  # no LUKS2 header and the LUN may be plain: I/O passes through
    WAITING_FOR_KEY = "WAITING_FOR_KEY"  # key id read, lookup in flight: NOT READY 04/01
    ENCRYPTED = "ENCRYPTED"  # DEK unwrapped and verified: encrypt/decrypt
    NO_KEY = "NO_KEY"  # refused, missing, destroyed or wrong key: DATA PROTECT 74/71
    UNKNOWN = "UNKNOWN"  # metadata unreadable or header vanished: NOT READY 04/03


@dataclass(frozen=True)
class Transition:
    """A change an initiator must learn of through a unit attention."""

    old: State
    new: State
    reason: str
    capacity_changed: bool = False

    def __str__(self) -> str:
        return f"{self.old.value} -> {self.new.value}: {self.reason}"


class VolumeError(Exception):
    """Base class for volume errors."""


class NotReadyError(VolumeError):
    """SCSI NOT READY; ``asc``/``ascq`` say why."""

    def __init__(self, message: str, asc: int = 0x04, ascq: int = 0x01) -> None:
        super().__init__(message)
        self.asc, self.ascq = asc, ascq


class DataProtectError(VolumeError):
    """SCSI DATA PROTECT, 74/71: LOGICAL UNIT ACCESS NOT AUTHORIZED."""

    asc, ascq = 0x74, 0x71


class LbaOutOfRangeError(VolumeError):
    """SCSI ILLEGAL REQUEST, 21/00: LOGICAL BLOCK ADDRESS OUT OF RANGE."""


class VolumeIOError(VolumeError):
    """The backing store failed (SCSI MEDIUM ERROR)."""


class OperationRefusedError(VolumeError):
    """An administrative operation was refused; the message says what to do."""
