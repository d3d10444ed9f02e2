"""Block-device backstore: size and block size by ioctl, BLKDISCARD and BLKZEROOUT."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import stat
import struct

from .base import BackstorePermissionError
from .file import UNSUPPORTED, FdBackstore, retry_eintr

# ioctl request numbers, <asm-generic/ioctl.h> layout (x86, arm, arm64, riscv, s390, loongarch):
# bits 0-7 number, 8-15 type, 16-29 argument size, 30-31 direction (0 none, 2 read: kernel -> user).
_IOC_NONE = 0
_IOC_READ = 2


def _ioc(direction: int, kind: int, number: int, size: int) -> int:
    return direction << 30 | size << 16 | kind << 8 | number


# <linux/fs.h>, all of type 0x12.  Numbers for x86_64: 0x125e 0x1268 0x80081272 0x1277 0x127f.
BLKROGET = _ioc(_IOC_NONE, 0x12, 94, 0)  # _IO(0x12,94): int, 1 if the device is read-only
BLKSSZGET = _ioc(_IOC_NONE, 0x12, 104, 0)  # _IO(0x12,104): int, logical block size
# _IOR(0x12,114,size_t): the header says size_t, but the kernel always writes a u64 byte count
BLKGETSIZE64 = _ioc(_IOC_READ, 0x12, 114, ctypes.sizeof(ctypes.c_size_t))
BLKDISCARD = _ioc(_IOC_NONE, 0x12, 119, 0)  # _IO(0x12,119): u64[2] {start, length}, both block-aligned
BLKZEROOUT = _ioc(_IOC_NONE, 0x12, 127, 0)  # _IO(0x12,127): u64[2] {start, length}, both block-aligned


class BlockBackstore(FdBackstore):
    """Backstore on a block device."""

    KIND = "a block device"
    IS_KIND = staticmethod(stat.S_ISBLK)

    def _ioctl_int(self, request: int, fmt: str, what: str) -> int:
        try:
            out = retry_eintr(lambda: fcntl.ioctl(self._fd, request, bytes(struct.calcsize(fmt))))
        except OSError as exc:
            raise self._error(exc, f"read the {what} of") from exc
        value: int = struct.unpack(fmt, out)[0]
        return value

    def _setup(self) -> None:
        # Linux opens a read-only block device for writing, then fails every write with EPERM.
        if not self.readonly and self._ioctl_int(BLKROGET, "i", "read-only flag"):
            raise BackstorePermissionError(
                f"{self.path} is a read-only block device: open it read-only, or make it writable "
                f"(blockdev --setrw {self.path})",
                path=self.path,
                errno=errno.EROFS,
            )

    def _query_size(self) -> int:
        return self._ioctl_int(BLKGETSIZE64, "Q", "size")

    def _query_block_size(self) -> int:
        return self._ioctl_int(BLKSSZGET, "i", "logical block size")

    def _aligned_part(self, offset: int, length: int) -> tuple[int, int]:
        """The largest block-aligned [start, end) inside [offset, offset + length) (may be empty)."""
        block = self._logical_block_size
        return -(-offset // block) * block, (offset + length) // block * block

    def _range_ioctl(self, request: int, start: int, end: int, what: str) -> bool:
        """Run BLKDISCARD/BLKZEROOUT on [start, end); False if the device cannot."""
        try:
            retry_eintr(lambda: fcntl.ioctl(self._fd, request, struct.pack("=QQ", start, end - start)))
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                return False
            raise self._error(exc, f"{what} {end - start} bytes at offset {start} of") from exc
        return True

    def _discard(self, offset: int, length: int) -> None:
        start, end = self._aligned_part(offset, length)
        if start < end:
            self._range_ioctl(BLKDISCARD, start, end, "discard")

    def _write_zeroes(self, offset: int, length: int) -> None:
        start, end = self._aligned_part(offset, length)
        if start >= end:
            self._write_zero_bytes(offset, length)
            return
        self._write_zero_bytes(offset, start - offset)
        if not self._range_ioctl(BLKZEROOUT, start, end, "zero"):
            self._write_zero_bytes(start, end - start)
        self._write_zero_bytes(end, offset + length - end)
