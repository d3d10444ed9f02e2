"""A one-line progress meter on stderr for long operations."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_MIB = 1 << 20


class Progress:
    """Prints ``label  42%  420/1000 MiB  350 MiB/s  ETA 2 s`` at most a few times a second.

    Silent unless ``enabled`` (by default: when the stream is a terminal)."""

    def __init__(self, label: str, total: int, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.total, self.done = label, total, 0
        self._start = self._last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.25 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate else 0.0
        self.stream.write(f"\r{self.label}  {pct:5.1f}%  {self.done / _MIB:.1f}/"
                          f"{self.total / _MIB:.1f} MiB  {rate / _MIB:.0f} MiB/s  ETA {eta:.0f} s ")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
