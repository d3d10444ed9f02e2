"""A lock over ranges of logical blocks: overlapping holders exclude each other."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

Span = tuple[int, int]


class RangeLock:
    """Writers of overlapping LBA ranges run one at a time; others run concurrently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._held: list[Span] = []
        self._waiters = 0

    def acquire(self, lba: int, count: int) -> Span | None:
        """Hold blocks ``[lba, lba + count)``; pass the result to :meth:`release`."""
        if count <= 0:
            return None
        start, end = lba, lba + count
        with self._lock:
            while self._held and any(s < end and start < e for s, e in self._held):
                self._waiters += 1
                self._cond.wait()
                self._waiters -= 1
            span = (start, end)
            self._held.append(span)
        return span

    def release(self, span: Span | None) -> None:
        if span is None:
            return
        with self._lock:
            self._held.remove(span)  # overlapping spans are never held twice
            if self._waiters:
                self._cond.notify_all()

    @contextmanager
    def hold(self, lba: int, count: int) -> Iterator[None]:
        """Hold blocks ``[lba, lba + count)`` for the duration of the ``with`` block."""
        span = self.acquire(lba, count)
        try:
            yield
        finally:
            self.release(span)

    def __len__(self) -> int:
        """How many ranges are held now."""
        with self._lock:
            return len(self._held)
