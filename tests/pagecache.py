"""Dropping a file's pages from the page cache, for reads that must not wait."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.backstore import WouldBlock


def refused_once_evicted(path: Path | str, attempt: Callable[[], object],
                         tries: int = 50) -> None:
    """Evict ``path``'s clean pages (fsync, POSIX_FADV_DONTNEED) and call ``attempt``
    (a read asked not to wait) until it raises WouldBlock; fail if it never does.

    Eviction is best effort (a page still on a CPU's LRU list, or under writeback,
    stays), hence the retries with growing pauses."""
    for n in range(tries):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        try:
            attempt()
        except WouldBlock:
            return
        time.sleep(0.002 * n)
    pytest.fail(f"a read of evicted pages of {path} never refused to wait ({tries} tries)")
