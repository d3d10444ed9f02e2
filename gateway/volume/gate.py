"""A reader/writer gate: I/O shares it, state changes take it exclusively."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Gate:
    """Many I/Os at once, or one state change with no I/O in flight.

    A waiting state change blocks new I/O, so it cannot be starved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def enter_shared(self) -> None:
        """Take the gate shared (pair with :meth:`leave_shared`)."""
        with self._lock:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1

    def try_enter_shared(self) -> bool:
        """Take the gate shared if that needs no wait (pair a True with :meth:`leave_shared`)."""
        with self._lock:
            if self._exclusive or self._waiting:
                return False
            self._shared += 1
            return True

    def leave_shared(self) -> None:
        with self._lock:
            self._shared -= 1
            if not self._shared and self._waiting:
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.enter_shared()
        try:
            yield
        finally:
            self.leave_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
