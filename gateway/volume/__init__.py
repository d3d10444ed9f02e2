"""The eVLU: state machine, per-state I/O rules, rescan, encrypt on/off, rekey."""

from .keys import KeySource
from .state import (DataProtectError, LbaOutOfRangeError, NotReadyError, OperationRefusedError,
                    State, Transition, VolumeError, VolumeIOError)
from .volume import Volume, wipe_data_area

__all__ = ["DataProtectError", "KeySource", "LbaOutOfRangeError", "NotReadyError",
           "OperationRefusedError", "State", "Transition", "Volume", "VolumeError",
           "VolumeIOError", "wipe_data_area"]
