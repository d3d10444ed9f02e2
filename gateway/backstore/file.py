"""File-descriptor I/O (shared with block devices) and the regular-file backstore."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable
from typing import ClassVar, TypeVar

from .base import (
    Backstore,
    BackstoreError,
    BackstoreIOError,
    ShortDeviceError,
    WouldBlock,
    error_from_oserror,
    stat_backing,
    wrong_kind_error,
)

T = TypeVar("T")

SECTOR = 512
BOUNCE_SIZE = 1 << 20  # per-thread O_DIRECT bounce buffer; larger I/O is split into chunks of this size
_ZEROES = bytes(BOUNCE_SIZE)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# errnos meaning "this file/device cannot do that operation"
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS})

_libc = ctypes.CDLL(None, use_errno=True)
# fallocate64 takes 64-bit offsets on every ABI; musl only exports fallocate (64-bit off_t there)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def retry_eintr(call: Callable[[], T]) -> T:
    """Run ``call`` again while it fails with EINTR.

    os.pread/os.pwrite/os.preadv/os.fdatasync already do this (PEP 475);
    ctypes calls and fcntl.ioctl do not.
    """
    while True:
        try:
            return call()
        except InterruptedError:
            continue


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of a file, keeping its size; it then reads as zeroes (OSError on failure)."""

    def call() -> None:
        if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    retry_eintr(call)


class FdBackstore(Backstore):
    """Backstore over a file descriptor: pread/pwrite loops, optional O_DIRECT via bounce buffers."""

    KIND: ClassVar[str]  # what the path must be, for error messages
    IS_KIND: ClassVar[Callable[[int], bool]]  # the matching test on st_mode

    def __init__(self, path: str, *, readonly: bool = False, direct: bool = False) -> None:
        st = stat_backing(path)
        if not self.IS_KIND(st.st_mode):
            raise wrong_kind_error(path, st.st_mode, self.KIND)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            self._fd = os.open(path, flags)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise BackstoreError(
                    f"cannot open {path} with O_DIRECT: its filesystem does not support direct I/O; "
                    "open it without direct I/O",
                    path=path,
                    errno=exc.errno,
                ) from exc
            raise error_from_oserror(exc, path, "open", BackstoreError) from exc
        super().__init__(path, readonly=readonly)
        self.direct = direct
        self._nowait_reads = True  # until the kernel refuses RWF_NOWAIT for this file
        self._bounce = threading.local()
        try:
            opened = os.fstat(self._fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                raise BackstoreError(f"{path} was replaced while being opened: retry", path=path)
            self._setup()
            self._size = self._query_size()
            self._logical_block_size = self._query_block_size()
        except BaseException:
            os.close(self._fd)
            raise
        if direct:
            self._alignment = self._logical_block_size

    def _setup(self) -> None:
        """Checks on the freshly opened descriptor, before the size is read."""

    def _query_block_size(self) -> int:
        """Logical block size of the open descriptor."""
        return SECTOR

    def _query_size(self) -> int:
        try:
            return os.fstat(self._fd).st_size
        except OSError as exc:
            raise self._error(exc, "stat") from exc

    def _error(self, exc: OSError, action: str) -> BackstoreError:
        if self.direct and exc.errno == errno.EINVAL:
            return BackstoreError(
                f"cannot {action} {self.path}: Invalid argument with O_DIRECT: the filesystem may need "
                "larger alignment than the logical block size; open it without direct I/O",
                path=self.path,
                errno=exc.errno,
            )
        return error_from_oserror(exc, self.path, action)

    def _bounce_view(self) -> memoryview:
        """This thread's page-aligned (mmap) bounce buffer."""
        view: memoryview | None = getattr(self._bounce, "view", None)
        if view is None:
            view = self._bounce.view = memoryview(mmap.mmap(-1, BOUNCE_SIZE))
        return view

    def _read_fully(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise self._error(exc, f"read {len(view) - done} bytes at offset {offset + done} of") from exc
            if got == 0:
                raise ShortDeviceError(
                    f"cannot read at offset {offset + done} of {self.path}: it ends there, so it shrank "
                    "underneath; refresh its size",
                    path=self.path,
                )
            done += got

    def _write_fully(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                put = os.pwrite(self._fd, view[done:], offset + done)
            except OSError as exc:
                raise self._error(exc, f"write {len(view) - done} bytes at offset {offset + done} of") from exc
            if put == 0:
                raise BackstoreIOError(
                    f"short write at offset {offset + done} of {self.path}: the medium accepted no data; "
                    "check free space and dmesg",
                    path=self.path,
                )
            done += put

    def _pread(self, length: int, offset: int) -> bytes:
        if self.direct:
            return super()._pread(length, offset)
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise self._error(exc, f"read {length} bytes at offset {offset} of") from exc
        if len(data) == length:
            return data
        buf = bytearray(length)
        buf[: len(data)] = data
        self._read_fully(memoryview(buf)[len(data) :], offset + len(data))
        return bytes(buf)

    def _preadinto(self, view: memoryview, offset: int) -> None:
        if not self.direct:
            self._read_fully(view, offset)
            return
        bounce = self._bounce_view()
        for start in range(0, len(view), BOUNCE_SIZE):
            chunk = min(BOUNCE_SIZE, len(view) - start)
            self._read_fully(bounce[:chunk], offset + start)
            view[start : start + chunk] = bounce[:chunk]

    def _preadinto_nowait(self, view: memoryview, offset: int) -> None:
        """One ``preadv2(RWF_NOWAIT)``: all of the range from the page cache, or
        WouldBlock (direct I/O always waits; any error is left to the waiting read)."""
        if self.direct or not self._nowait_reads:
            raise WouldBlock
        try:
            got = os.preadv(self._fd, [view], offset, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:  # not on this file: stop asking
                self._nowait_reads = False
            raise WouldBlock from None
        if got < len(view):
            raise WouldBlock  # partly cached

    def _pwrite(self, view: memoryview, offset: int) -> None:
        if not self.direct:
            self._write_fully(view, offset)
            return
        bounce = self._bounce_view()
        for start in range(0, len(view), BOUNCE_SIZE):
            chunk = min(BOUNCE_SIZE, len(view) - start)
            bounce[:chunk] = view[start : start + chunk]
            self._write_fully(bounce[:chunk], offset + start)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        """Zero a range by writing zeroes (the fallback of write_zeroes)."""
        zeroes = memoryview(_ZEROES)
        for start in range(0, length, BOUNCE_SIZE):
            self._pwrite(zeroes[: min(BOUNCE_SIZE, length - start)], offset + start)

    def _flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self._error(exc, "flush (fdatasync)") from exc

    def _close(self) -> None:
        os.close(self._fd)


class FileBackstore(FdBackstore):
    """Backstore on a regular file (logical block size 512)."""

    KIND = "a regular file"
    IS_KIND = staticmethod(stat.S_ISREG)

    def _punch(self, offset: int, length: int) -> bool:
        """Punch a hole; False if the filesystem cannot."""
        try:
            punch_hole(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                return False
            raise self._error(exc, f"punch a hole of {length} bytes at offset {offset} in") from exc
        return True

    def _discard(self, offset: int, length: int) -> None:
        self._punch(offset, length)

    def _allocation(self, offset: int, length: int) -> tuple[bool, int]:
        """Holes by SEEK_DATA/SEEK_HOLE (a filesystem without them reports all data)."""
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from offset to the end of the file
                return False, length
            if exc.errno in UNSUPPORTED:
                return True, length
            raise self._error(exc, f"look for data at offset {offset} in") from exc
        if data > offset:
            return False, min(data - offset, length)
        try:
            hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        except OSError as exc:
            raise self._error(exc, f"look for a hole at offset {offset} in") from exc
        return True, min(max(hole - offset, 1), length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        if not self._punch(offset, length):
            self._write_zero_bytes(offset, length)
