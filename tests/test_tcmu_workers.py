"""The TCMU device's worker pool: every item runs once, a slow one holds up no other."""

from __future__ import annotations

import collections
import logging
import os
import threading

import pytest

from gateway.tcmu.workers import Workers

ALLOWED = sorted(os.sched_getaffinity(0))


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


def _affinities(cpus: set[int] | None) -> set[frozenset[int]]:
    """The CPU sets the items of a pool with ``cpus`` ran with."""
    seen: set[frozenset[int]] = set()
    done = threading.Semaphore(0)

    def run(item: int) -> None:
        seen.add(frozenset(os.sched_getaffinity(0)))  # 0: the calling thread
        done.release()

    pool = Workers(3, run, "pinned", cpus)
    for _ in range(20):
        pool.submit(range(5))
    for _ in range(100):
        assert done.acquire(timeout=30)
    pool.shutdown()
    return seen


@pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning is only seen with two CPUs or more")
def test_threads_run_on_the_cpus_given() -> None:
    assert _affinities({ALLOWED[-1]}) == {frozenset({ALLOWED[-1]})}
    assert _affinities(None) == {frozenset(ALLOWED)}
    assert os.sched_getaffinity(0) == set(ALLOWED)  # the caller's own is untouched


def test_a_cpu_the_kernel_refuses_is_logged_and_the_items_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.tcmu.workers"):
        assert _affinities({4095}) == {frozenset(ALLOWED)}
    assert "stays unpinned: CPUs [4095]" in caplog.text
