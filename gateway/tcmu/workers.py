"""A pool of threads for the commands that may wait for the medium.

:class:`concurrent.futures.ThreadPoolExecutor` builds a Future per call and
wakes a thread for each; a TCMU device needs no result object and hands calls
over in batches.  Here a batch goes into one queue and wakes at most one
thread per call; a woken thread runs calls until the queue is empty.  So a
batch of 32 costs a few wake-ups, not 32, and a slow call holds up no other:
idle threads take the rest.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from typing import AbstractSet, Callable, Generic, Sequence, TypeVar

_log = logging.getLogger(__name__)

T = TypeVar("T")


class Workers(Generic[T]):
    """``count`` daemon threads that run ``run(item)`` for every submitted item
    (on ``cpus`` only, when given: see :func:`pin_thread`)."""

    def __init__(self, count: int, run: Callable[[T], None], name: str,
                 cpus: AbstractSet[int] | None = None) -> None:
        if count < 1:
            raise ValueError("a pool needs at least one thread")
        self._run = run
        self._cpus = cpus
        self._items: collections.deque[T] = collections.deque()
        # A token wakes one thread; a surplus token (its items already taken by
        # another thread) costs that thread one look at an empty queue.
        self._tokens: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, items: Sequence[T]) -> None:
        """Queue ``items``; each runs on some thread, in no set order."""
        self._items.extend(items)
        for _ in range(min(len(items), len(self._threads))):
            self._tokens.put(True)

    def shutdown(self, wait: bool = True) -> None:
        """Stop every thread once it finds the queue empty; ``wait``: join them."""
        for _ in self._threads:
            self._tokens.put(False)
        if wait:
            for thread in self._threads:
                thread.join()

    def _loop(self) -> None:
        if self._cpus is not None:
            pin_thread(self._cpus)
        items, run = self._items, self._run
        while self._tokens.get():
            while True:
                try:
                    item = items.popleft()
                except IndexError:
                    break
                run(item)


def pin_thread(cpus: AbstractSet[int]) -> None:
    """Keep the calling thread on ``cpus``; logged, not raised, when the kernel refuses
    (a CPU gone offline, or outside the process's cpuset)."""
    try:
        os.sched_setaffinity(0, cpus)  # 0: this thread, not the whole process
    except OSError as exc:
        _log.warning("thread %s stays unpinned: CPUs %s: %s",
                     threading.current_thread().name, sorted(cpus), exc)
