"""In-memory backstore for sans-IO tests and fuzzers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from .base import Backstore

if TYPE_CHECKING:
    from typing_extensions import Buffer

SECTOR = 512


class MemoryBackstore(Backstore):
    """bytearray-backed backstore with the semantics of a file backstore (discard zeroes)."""

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        if size < 0:
            raise ValueError(f"negative size {size}")
        super().__init__("<memory>", readonly=readonly)
        self._buf = bytearray(size)
        self._size = size
        self._logical_block_size = SECTOR

    @classmethod
    def from_bytes(cls, data: Buffer, *, readonly: bool = False) -> Self:
        """A backstore holding a copy of ``data``."""
        store = cls(0, readonly=readonly)
        store._buf = bytearray(data)
        store._size = len(store._buf)
        return store

    @property
    def data(self) -> bytes:
        """A copy of the whole content (also available after close, for inspection)."""
        return bytes(self._buf)

    def _query_size(self) -> int:
        return len(self._buf)

    def _preadinto(self, view: memoryview, offset: int) -> None:
        with memoryview(self._buf) as buf:
            view[:] = buf[offset : offset + len(view)]

    def _preadinto_nowait(self, view: memoryview, offset: int) -> None:
        self._preadinto(view, offset)  # memory is always at hand

    def _pwrite(self, view: memoryview, offset: int) -> None:
        self._buf[offset : offset + len(view)] = view

    def _flush(self) -> None:
        pass

    def _discard(self, offset: int, length: int) -> None:
        self._write_zeroes(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._buf[offset : offset + length] = bytes(length)

    def _close(self) -> None:
        pass
