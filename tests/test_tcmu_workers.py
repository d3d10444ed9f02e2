"""The TCMU device's worker pool: every item runs once, a slow one holds up no other."""

from __future__ import annotations

import collections
import threading

import pytest

from gateway.tcmu.workers import Workers


def test_every_item_runs_once_on_a_pool_thread() -> None:
    ran: collections.Counter[int] = collections.Counter()
    threads: set[str] = set()
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def run(item: int) -> None:
        with lock:
            ran[item] += 1
            threads.add(threading.current_thread().name)
        done.release()

    pool = Workers(3, run, "test-pool")
    batches = [list(range(start, start + size))
               for start, size in zip(range(0, 10_000, 100), [1, 2, 3, 7, 32, 64, 99] * 20)]
    for batch in batches:
        pool.submit(batch)
    total = sum(map(len, batches))
    for _ in range(total):
        assert done.acquire(timeout=30)
    pool.shutdown()
    assert ran == collections.Counter(item for batch in batches for item in batch)
    assert threads <= {"test-pool-0", "test-pool-1", "test-pool-2"}


def test_a_slow_item_holds_up_no_other() -> None:
    gate, started = threading.Event(), threading.Event()
    finished: list[str] = []
    others_done = threading.Event()

    def run(item: str) -> None:
        if item == "slow":
            started.set()
            assert gate.wait(30)
        finished.append(item)
        if {"a", "b", "c"} <= set(finished):
            others_done.set()

    pool = Workers(2, run, "test-pool")
    pool.submit(["slow", "a", "b", "c"])  # one batch: the second thread takes the rest
    assert started.wait(30)
    assert others_done.wait(30), f"finished only {finished} while one item was slow"
    assert "slow" not in finished
    gate.set()
    pool.shutdown()
    assert sorted(finished) == ["a", "b", "c", "slow"]


def test_shutdown_runs_what_was_queued_then_joins() -> None:
    gate = threading.Event()
    finished: list[int] = []

    def run(item: int) -> None:
        assert gate.wait(30)
        finished.append(item)

    pool = Workers(2, run, "test-pool")
    pool.submit(list(range(10)))
    threads = list(pool._threads)
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert sorted(finished) == list(range(10))
    assert not any(thread.is_alive() for thread in threads)


def test_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        Workers(0, print, "test-pool")
