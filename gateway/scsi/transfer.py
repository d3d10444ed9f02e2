"""The data buffer of one command, as the SCSI layer sees it."""

from __future__ import annotations

from typing import Protocol

from .sense import GOOD, Result

Buffer = bytes | bytearray | memoryview


class Transfer(Protocol):
    """A command's data buffer (the kernel's iovecs, or memory in tests).

    ``length`` is the buffer's total size, which may differ from the
    transfer length the CDB asks for; nothing may touch bytes past it.
    """

    length: int

    def data_out(self, length: int) -> memoryview:
        """The first ``length`` (<= ``self.length``) bytes the initiator sent."""

    def data_in(self, data: Buffer, offset: int = 0) -> None:
        """Copy ``data`` to the buffer at ``offset``, truncated at ``self.length``."""

    def in_view(self, length: int) -> memoryview | None:
        """A writable view of the first ``length`` bytes if the buffer is one piece, else None."""


def send(xfer: Transfer, data: Buffer, allocation_length: int) -> Result:
    """Return ``data`` as data-in, truncated to the allocation length and the buffer."""
    length = min(len(data), allocation_length, xfer.length)
    if length:
        xfer.data_in(memoryview(data)[:length])
    return Result(GOOD, b"", length)


class BytesTransfer:
    """An in-memory :class:`Transfer`: one buffer of ``max(len(data_out), length)``
    bytes, starting with ``data_out``.  ``contiguous=False`` makes
    :meth:`in_view` return None, as for a scattered buffer."""

    def __init__(self, data_out: Buffer = b"", length: int = 0, *, contiguous: bool = True) -> None:
        out = memoryview(data_out).cast("B")
        self.length = max(out.nbytes, length)
        self._buf = bytearray(self.length)
        self._buf[: out.nbytes] = out
        self._contiguous = contiguous
        self._in_end = 0

    @property
    def buffer(self) -> bytes:
        """The whole buffer as it is now."""
        return bytes(self._buf)

    @property
    def received(self) -> bytes:
        """The buffer up to the furthest byte handed out for data-in."""
        return bytes(self._buf[: self._in_end])

    def data_out(self, length: int) -> memoryview:
        if not 0 <= length <= self.length:
            raise ValueError(f"data_out({length}) outside a {self.length}-byte buffer")
        return memoryview(self._buf)[:length]

    def data_in(self, data: Buffer, offset: int = 0) -> None:
        view = memoryview(data).cast("B")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        end = min(offset + view.nbytes, self.length)
        if end > offset:
            self._buf[offset:end] = view[: end - offset]
            self._in_end = max(self._in_end, end)

    def in_view(self, length: int) -> memoryview | None:
        if not 0 <= length <= self.length:
            raise ValueError(f"in_view({length}) outside a {self.length}-byte buffer")
        if not self._contiguous:
            return None
        self._in_end = max(self._in_end, length)
        return memoryview(self._buf)[:length]
