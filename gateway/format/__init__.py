"""The eVLU on-disk format: LUKS2 headers, keyslots and the evlu-kmip token."""

from .disk import Device, Header, ReadResult, probe, read, repair
from .errors import (FormatError, HeaderCorruptError, HeaderExistsError, LayoutError,
                     NoHeaderError, UnsupportedError, WrongKeyError)
from .luks2 import (DEFAULT_DATA_OFFSET, MIN_DATA_OFFSET, Binding, add_binding, check_layout,
                    create, erase, remove_binding, rotate, unlock, unlock_keyslot)
from .metadata import EVLU_TOKEN, EvluToken, Metadata, Segment

__all__ = [
    "DEFAULT_DATA_OFFSET", "EVLU_TOKEN", "MIN_DATA_OFFSET", "Binding", "Device", "EvluToken",
    "FormatError", "Header", "HeaderCorruptError", "HeaderExistsError", "LayoutError",
    "Metadata", "NoHeaderError", "ReadResult", "Segment", "UnsupportedError", "WrongKeyError",
    "add_binding", "check_layout", "create", "erase", "probe", "read", "remove_binding",
    "repair", "rotate", "unlock", "unlock_keyslot",
]
