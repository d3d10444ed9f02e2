"""A command's data buffer: the iovecs of its ring entry, as a SCSI transfer."""

from __future__ import annotations

from .ring import Iovec


class IovecTransfer:
    """Gather data-out from, and scatter data-in to, a command's iovecs.

    Only ``[offset, offset + length)`` of each iovec is ever touched (the
    kernel reclaims idle data pages: a fault elsewhere is SIGBUS).
    """

    def __init__(self, mem: memoryview, iovecs: tuple[Iovec, ...]) -> None:
        self._mem = mem
        self._iovecs = iovecs
        self.length = iovecs[0].length if len(iovecs) == 1 else sum(v.length for v in iovecs)

    def data_out(self, length: int) -> memoryview:
        """The first ``length`` bytes the initiator sent (a view when in one iovec)."""
        length = min(length, self.length)
        if not length:
            return memoryview(b"")
        first = self._iovecs[0]
        if first.length >= length:
            return self._mem[first.offset:first.offset + length]
        out = bytearray(length)
        pos = 0
        for v in self._iovecs:
            n = min(v.length, length - pos)
            out[pos:pos + n] = self._mem[v.offset:v.offset + n]
            pos += n
            if pos == length:
                break
        return memoryview(out)

    def data_in(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Scatter ``data`` to the buffer from ``offset``; what does not fit is dropped."""
        src = memoryview(data).cast("B")
        skip, pos = offset, 0
        for v in self._iovecs:
            if pos >= len(src):
                return
            if skip >= v.length:
                skip -= v.length
                continue
            n = min(v.length - skip, len(src) - pos)
            start = v.offset + skip
            self._mem[start:start + n] = src[pos:pos + n]
            pos += n
            skip = 0

    def in_view(self, length: int) -> memoryview | None:
        """A writable view of the first ``length`` bytes, if one iovec holds them."""
        if self._iovecs and self._iovecs[0].length >= length:
            first = self._iovecs[0]
            return self._mem[first.offset:first.offset + length]
        return None

    def zero_from(self, offset: int) -> None:
        """Zero the buffer from ``offset`` on (no READ_LEN: never leak stale data)."""
        for v in self._iovecs:
            if offset >= v.length:
                offset -= v.length
                continue
            self._mem[v.offset + offset:v.offset + v.length] = bytes(v.length - offset)
            offset = 0
