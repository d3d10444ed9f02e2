"""A lock over ranges of logical blocks: overlapping holders exclude each other."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RangeLock:
    """Writers of overlapping LBA ranges run one at a time; others run concurrently."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int]] = []

    @contextmanager
    def hold(self, lba: int, count: int) -> Iterator[None]:
        """Hold blocks ``[lba, lba + count)`` for the duration of the ``with`` block."""
        if count <= 0:
            yield
            return
        span = (lba, lba + count)
        with self._cond:
            while any(start < span[1] and span[0] < end for start, end in self._held):
                self._cond.wait()
            self._held.append(span)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(span)  # overlapping spans are never held twice
                self._cond.notify_all()

    def __len__(self) -> int:
        """How many ranges are held now."""
        with self._cond:
            return len(self._held)
