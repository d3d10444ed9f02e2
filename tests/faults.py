"""Fault-injecting backstore for crash-safety tests.

Typical use: run an operation once on ``FaultyBackstore(inner, None)`` to
learn ``writes``, then for N in 1..writes rerun it on a fresh copy wrapped in
``FaultyBackstore(copy, N, mode)`` and check what is left on ``copy``.
"""

from __future__ import annotations

import errno
import random
from typing import Literal

from gateway.backstore import Backstore, BackstoreIOError

SECTOR = 512
Mode = Literal["fail", "tear"]


class FaultyBackstore(Backstore):
    """Wraps ``inner``; from write number ``fail_after`` (1-based) on, writes are cut.

    Writes are pwrite, write_zeroes and discard calls that reach the medium
    (zero-length ones are no-ops and are not counted).  Mode "fail": the cut
    write stores nothing.  Mode "tear": it stores its first k whole sectors
    (0 <= k < its sector count, k drawn from ``seed``) and the first half of
    the next sector, then fails; sectors are 512-byte units from the start of
    the write (a torn discard stores zeroes, like a file's discard).  Either
    way every later write and flush fails too, as after a power cut; reads
    pass through.  ``fail_after=None`` only counts.  Closing the wrapper
    leaves ``inner`` open for inspection.
    """

    def __init__(self, inner: Backstore, fail_after: int | None, mode: Mode = "fail", seed: int = 0) -> None:
        if fail_after is not None and fail_after < 1:
            raise ValueError(f"fail_after is 1-based, got {fail_after}")
        if mode not in ("fail", "tear"):
            raise ValueError(f"mode must be 'fail' or 'tear', got {mode!r}")
        super().__init__(inner.path, readonly=inner.readonly)
        self.inner = inner
        self.fail_after = fail_after
        self.mode = mode
        self.seed = seed
        self.writes = 0
        self.torn: tuple[int, int] | None = None  # (offset, bytes stored) of the torn write
        self._size = inner.size
        self._logical_block_size = inner.logical_block_size

    @property
    def cut(self) -> bool:
        """True once the power cut has happened."""
        return self.fail_after is not None and self.writes >= self.fail_after

    def _gate(self, kind: str, offset: int, length: int, new: memoryview | None) -> None:
        """Count a write (``new`` is None for zeroes); at or after the cut, apply it and raise."""
        self.writes += 1
        if not self.cut:
            return
        if self.writes == self.fail_after and self.mode == "tear":
            k = random.Random(self.seed).randrange(-(-length // SECTOR))
            stored = k * SECTOR + min(SECTOR, length - k * SECTOR) // 2
            prefix = bytes(stored) if new is None else bytes(new[:stored])
            self.inner.pwrite(prefix + self.inner.pread(length - stored, offset + stored), offset)
            self.torn = (offset, stored)
        raise BackstoreIOError(
            f"simulated power cut at write #{self.writes} ({kind} of {length} bytes at offset {offset}) "
            f"on {self.path}",
            path=self.path,
            errno=errno.EIO,
        )

    def _query_size(self) -> int:
        return self.inner.refresh_size()

    def _preadinto(self, view: memoryview, offset: int) -> None:
        self.inner.preadinto(view, offset)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        self._gate("write", offset, len(view), view)
        self.inner.pwrite(view, offset)

    def _discard(self, offset: int, length: int) -> None:
        self._gate("discard", offset, length, None)
        self.inner.discard(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._gate("write zeroes", offset, length, None)
        self.inner.write_zeroes(offset, length)

    def _flush(self) -> None:
        if self.cut:
            raise BackstoreIOError(
                f"simulated power cut: flush of {self.path} fails", path=self.path, errno=errno.EIO
            )
        self.inner.flush()

    def _close(self) -> None:
        pass
