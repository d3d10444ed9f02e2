"""What a logical unit is built from: its backend, its identity and its limits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..volume import State, Transition
from .transfer import Buffer

#: IEEE company id LIO puts in NAA designators (the SCSI layer of Linux)
LIO_OUI = 0x001405


class Backend(Protocol):
    """The block device a logical unit serves: what :class:`gateway.volume.Volume` offers."""

    @property
    def state(self) -> State: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def header(self) -> Any: ...  # None when the volume is plain
    def readinto(self, lba: int, buf: bytearray | memoryview, *, nowait: bool = False) -> None:
        ...
    def read_cached(self, requests: Sequence[tuple[int, memoryview]]) -> list[bool]: ...
    def write(self, lba: int, data: Buffer, *, fua: bool = False) -> None: ...
    def flush(self) -> None: ...
    def unmap(self, lba: int, nblocks: int) -> None: ...
    def provisioning_status(self, lba: int, nblocks: int) -> tuple[bool, int]: ...
    def add_listener(self, listener: Callable[[Any, Transition], None]) -> None: ...


def naa_from_serial(serial: str) -> int:
    """The NAA IEEE Registered Extended (type 6) designator LIO derives from a
    unit serial number: OUI 00-14-05, then the serial's first 25 hex digits
    (other characters skipped), zero-filled."""
    digits = "".join(c for c in serial.lower() if c in "0123456789abcdef")[:25]
    return (0x6 << 124) | (LIO_OUI << 100) | int(digits.ljust(25, "0"), 16)


def _ascii(value: str, size: int, what: str) -> bytes:
    data = value.encode("ascii")
    if len(data) > size or any(b < 0x20 or b > 0x7E for b in data):
        raise ValueError(f"{what} {value!r}: at most {size} printable ASCII characters")
    return data.ljust(size, b" ")


@dataclass(frozen=True)
class Identity:
    """How the logical unit names itself in INQUIRY data.

    ``serial`` is the unit serial number (LIO's ``wwn/vpd_unit_serial``);
    ``naa`` defaults to the designator LIO derives from it (none without a
    serial); ``device_id`` adds a vendor-specific designator to VPD page 83.
    """

    serial: str = ""
    vendor: str = "EVLU"
    product: str = "eVLU"
    revision: str = "0001"
    naa: int | None = None
    device_id: bytes | None = None

    def __post_init__(self) -> None:
        _ascii(self.vendor, 8, "vendor")
        _ascii(self.product, 16, "product")
        _ascii(self.revision, 4, "revision")
        _ascii(self.serial, 240, "serial")  # + 8 bytes of vendor in VPD 83
        if self.serial and self.naa is None:
            object.__setattr__(self, "naa", naa_from_serial(self.serial))
        if self.naa is not None and not 0 <= self.naa < 1 << 128:
            raise ValueError("naa must fit in 16 bytes")
        if self.device_id is not None and not 0 < len(self.device_id) <= 251:
            raise ValueError("device_id must be 1..251 bytes")


@dataclass(frozen=True)
class Limits:
    """What the logical unit advertises and enforces (VPD B0/B2, MODE SENSE).

    Block counts are in logical blocks; 0 means "no limit" where SBC allows
    it (transfer, write same).  ``write_cache`` is WCE: leave it on unless
    every write is durable when it completes (O_DIRECT/O_DSYNC), so that
    initiators send SYNCHRONIZE CACHE.  ``plain_unmap_reads_zeroes`` claims
    LBPRZ for a plain volume (its backstore punches holes that read back as
    zeroes); an encrypted volume always reads unmapped blocks as zeroes.
    """

    max_transfer_blocks: int = 0
    optimal_transfer_blocks: int = 0
    max_unmap_blocks: int = 0xFFFFFFFF
    max_unmap_descriptors: int = 256
    max_write_same_blocks: int = 0
    max_compare_write_blocks: int = 1
    unmap_supported: bool = True
    write_cache: bool = True
    plain_unmap_reads_zeroes: bool = False

    def __post_init__(self) -> None:
        for name in ("max_transfer_blocks", "optimal_transfer_blocks", "max_unmap_blocks",
                     "max_unmap_descriptors"):
            if not 0 <= getattr(self, name) <= 0xFFFFFFFF:
                raise ValueError(f"{name} must fit in 32 bits")
        if not 0 <= self.max_write_same_blocks < 1 << 64:
            raise ValueError("max_write_same_blocks must fit in 64 bits")
        if not 0 <= self.max_compare_write_blocks <= 255:
            raise ValueError("max_compare_write_blocks must be 0..255")
