"""Backstores: the files, block devices (or memory) that hold the encrypted LUN data."""

from __future__ import annotations

import stat

from .base import (
    Backstore,
    BackstoreError,
    BackstoreIOError,
    BackstoreNotFoundError,
    BackstorePermissionError,
    ShortDeviceError,
    WouldBlock,
    stat_backing,
    wrong_kind_error,
)
from .block import BlockBackstore
from .file import FileBackstore
from .memory import MemoryBackstore

__all__ = [
    "Backstore",
    "BackstoreError",
    "BackstoreIOError",
    "BackstoreNotFoundError",
    "BackstorePermissionError",
    "BlockBackstore",
    "FileBackstore",
    "MemoryBackstore",
    "ShortDeviceError",
    "WouldBlock",
    "open_backstore",
]


def open_backstore(path: str, *, readonly: bool = False, direct: bool = False) -> Backstore:
    """Open a regular file or block device (symlinks followed); ``direct`` uses O_DIRECT."""
    mode = stat_backing(path).st_mode
    if stat.S_ISREG(mode):
        return FileBackstore(path, readonly=readonly, direct=direct)
    if stat.S_ISBLK(mode):
        return BlockBackstore(path, readonly=readonly, direct=direct)
    raise wrong_kind_error(path, mode, "a regular file or a block device")
