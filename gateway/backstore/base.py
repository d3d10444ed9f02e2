"""Backstore interface, its errors, and the OSError -> BackstoreError mapping."""

from __future__ import annotations

import abc
import errno as _errno
import os
import stat
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from typing_extensions import Buffer


class BackstoreError(Exception):
    """A backstore operation failed; the message says what happened and what to do."""

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class BackstoreNotFoundError(BackstoreError):
    """The file or device does not exist (or is gone)."""


class BackstorePermissionError(BackstoreError):
    """Access denied: permissions, read-only filesystem/device, or a read-only backstore."""


class ShortDeviceError(BackstoreError):
    """Access beyond the end, or a device smaller than required."""


class BackstoreIOError(BackstoreError):
    """EIO, ENOSPC and other failures of the medium (including short writes)."""


class WouldBlock(Exception):
    """A read asked not to wait found its data not at hand (not in the page cache):
    nothing was changed; run it again where waiting is fine."""


# errno -> (error class, what to do about it)
_ERRNO_ADVICE: dict[int, tuple[type[BackstoreError], str]] = {
    _errno.ENOENT: (BackstoreNotFoundError, "check the path, or create the file first"),
    _errno.ENOTDIR: (BackstoreNotFoundError, "check the path: a component of it is not a directory"),
    _errno.ENXIO: (BackstoreNotFoundError, "the device is gone or has no medium: check it is attached"),
    _errno.ENODEV: (BackstoreNotFoundError, "the device is gone: check it is attached"),
    _errno.EACCES: (BackstorePermissionError, "run as a user allowed to access it, or open it read-only"),
    _errno.EPERM: (
        BackstorePermissionError,
        "the file is immutable (lsattr) or the device read-only (blockdev --getro): "
        "fix that, or open it read-only",
    ),
    _errno.EROFS: (
        BackstorePermissionError,
        "it is on a read-only filesystem or device: remount it read-write, or open it read-only",
    ),
    _errno.EIO: (BackstoreIOError, "the medium reported an I/O error: check dmesg and the device health"),
    _errno.ENOSPC: (
        BackstoreIOError,
        "no space left on the filesystem holding it (sparse file?): free space or preallocate the file",
    ),
    _errno.EDQUOT: (BackstoreIOError, "disk quota exceeded: raise the quota or free space"),
    _errno.EBUSY: (BackstoreError, "it is in use (mounted, or held by another program): release it first"),
}


def error_from_oserror(
    exc: OSError, path: str, action: str, default: type[BackstoreError] = BackstoreIOError
) -> BackstoreError:
    """Turn ``exc`` (raised while doing ``action`` on ``path``) into the matching BackstoreError."""
    cls, advice = _ERRNO_ADVICE.get(exc.errno or 0, (default, "check dmesg and the device"))
    reason = exc.strerror or str(exc)
    return cls(f"cannot {action} {path}: {reason}: {advice}", path=path, errno=exc.errno)


def stat_backing(path: str) -> os.stat_result:
    """stat() ``path`` (following symlinks), raising BackstoreError subclasses."""
    try:
        return os.stat(path)
    except OSError as exc:
        raise error_from_oserror(exc, path, "stat", BackstoreError) from exc


def wrong_kind_error(path: str, mode: int, wanted: str) -> BackstoreError:
    """Error for a path that is not the kind of file we can serve."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISBLK, "a block device"),
    )
    what = next((name for test, name in kinds if test(mode)), "an unsupported file type")
    return BackstoreError(f"{path} is {what}: give {wanted} instead", path=path)


class Backstore(abc.ABC):
    """Fixed-size random-access byte store backing a LUN.

    The public methods check the closed state, read-only flag, bounds
    (against ``size`` as last read, see ``refresh_size``) and alignment
    (direct I/O), then call the
    ``_``-prefixed hooks, which subclasses implement.  Zero-length accesses
    are checked but never reach the hooks.  Negative offsets or lengths are
    programming errors and raise ValueError.
    """

    path: str
    readonly: bool
    _size: int  # subclasses set it, and _logical_block_size, when opening
    _logical_block_size: int
    _alignment: int = 1  # offsets and lengths must be multiples of this (O_DIRECT)
    _closed: bool = False

    def __init__(self, path: str, *, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly

    @property
    def size(self) -> int:
        """Size in bytes, as of opening or the last ``refresh_size``."""
        self._check_open()
        return self._size

    @property
    def logical_block_size(self) -> int:
        """Smallest addressable unit in bytes (the O_DIRECT alignment)."""
        self._check_open()
        return self._logical_block_size

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._closed

    def refresh_size(self) -> int:
        """Re-read the size from the medium (it may have grown or shrunk) and return it."""
        self._check_open()
        self._size = self._query_size()
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset``."""
        self._check_range("read", offset, length)
        return self._pread(length, offset) if length else b""

    def preadinto(self, buf: Buffer, offset: int, *, nowait: bool = False) -> None:
        """Fill the writable buffer ``buf`` with the bytes at ``offset``.

        ``nowait``: raise :class:`WouldBlock` rather than wait for the medium
        (``buf`` may then hold part of the data)."""
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError("preadinto() needs a writable buffer")
        self._check_range("read", offset, view.nbytes)
        if view.nbytes:
            if nowait:
                self._preadinto_nowait(view, offset)
            else:
                self._preadinto(view, offset)

    def pwrite(self, data: Buffer, offset: int) -> None:
        """Write all of ``data`` at ``offset``; never extends the backstore."""
        view = memoryview(data).cast("B")
        self._check_writable("write to")
        self._check_range("write", offset, view.nbytes)
        if view.nbytes:
            self._pwrite(view, offset)

    def flush(self) -> None:
        """Make completed writes durable (fdatasync)."""
        self._check_open()
        self._flush()

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        """(allocated, n): the first ``n`` bytes (1..``length``) of the range share one
        state; allocated when the store cannot tell (it holds no holes it knows of)."""
        self._check_open()
        self._check_range("query", offset, length)
        if length <= 0:
            raise ValueError("allocation() needs a non-empty range")
        return self._allocation(offset, length)

    def _allocation(self, offset: int, length: int) -> tuple[bool, int]:
        return True, length

    def discard(self, offset: int, length: int) -> None:
        """Hint that the range is unused; afterwards it may read as zeroes or as old data."""
        self._check_writable("discard on")
        self._check_range("discard", offset, length)
        if length:
            self._discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeroes."""
        self._check_writable("write zeroes to")
        self._check_range("write zeroes", offset, length)
        if length:
            self._write_zeroes(offset, length)

    def close(self) -> None:
        """Release the backstore (idempotent); does not flush."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._size} bytes"
        mode = "ro" if self.readonly else "rw"
        return f"<{type(self).__name__} {self.path} {mode} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise BackstoreError(
                f"{self.path} is closed: open it again before using it", path=self.path, errno=_errno.EBADF
            )

    def _check_writable(self, action: str) -> None:
        self._check_open()
        if self.readonly:
            raise BackstorePermissionError(
                f"cannot {action} {self.path}: it was opened read-only; reopen it without read-only",
                path=self.path,
                errno=_errno.EROFS,
            )

    def _check_range(self, action: str, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length}) for {action} on {self.path}")
        if offset + length > self._size:
            raise ShortDeviceError(
                f"cannot {action} {length} bytes at offset {offset} of {self.path}: it ends at "
                f"{self._size} bytes; stay within the device, or refresh its size if it grew",
                path=self.path,
            )
        if offset % self._alignment or length % self._alignment:
            raise BackstoreError(
                f"cannot {action} {length} bytes at offset {offset} of {self.path}: it is open for direct "
                f"I/O, so offset and length must be multiples of {self._alignment} bytes",
                path=self.path,
                errno=_errno.EINVAL,
            )

    @abc.abstractmethod
    def _query_size(self) -> int:
        """Current size of the medium."""

    def _pread(self, length: int, offset: int) -> bytes:
        """Read a checked, non-empty range (override when bytes can be had without a copy)."""
        buf = bytearray(length)
        self._preadinto(memoryview(buf), offset)
        return bytes(buf)

    @abc.abstractmethod
    def _preadinto(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` (byte format, non-empty) from a checked range."""

    def _preadinto_nowait(self, view: memoryview, offset: int) -> None:
        """As :meth:`_preadinto`, or raise :class:`WouldBlock` if that would wait for
        the medium (this default cannot tell, so it always does)."""
        raise WouldBlock

    @abc.abstractmethod
    def _pwrite(self, view: memoryview, offset: int) -> None:
        """Write ``view`` (byte format, non-empty) to a checked range."""

    @abc.abstractmethod
    def _flush(self) -> None:
        """Make completed writes durable."""

    @abc.abstractmethod
    def _discard(self, offset: int, length: int) -> None:
        """Discard a checked, non-empty range."""

    @abc.abstractmethod
    def _write_zeroes(self, offset: int, length: int) -> None:
        """Zero a checked, non-empty range."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release resources (called once)."""
