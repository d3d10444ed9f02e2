"""Errors raised by the on-disk format layer.

Every failure of parsing or validating metadata raises a :class:`FormatError`
subclass; nothing else escapes the parser (fuzz-tested).
"""


class FormatError(Exception):
    """Base class: the metadata is absent, damaged, unsupported or misused."""


class NoHeaderError(FormatError):
    """No LUKS2 header (no magic at the primary or any secondary offset)."""


class HeaderCorruptError(FormatError):
    """A LUKS2 signature is present but no copy of the header is valid."""


class HeaderExistsError(FormatError):
    """Refusing to overwrite an existing LUKS header without ``force``."""


class UnsupportedError(FormatError):
    """Valid LUKS2 metadata using a feature this implementation lacks."""


class LayoutError(FormatError):
    """The requested layout does not fit (device too small, no free area)."""


class WrongKeyError(FormatError):
    """The KEK (passphrase) does not open the keyslot: digest mismatch."""
