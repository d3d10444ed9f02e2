"""Stopping a ring device: in-flight commands finish, or get BUSY after the timeout."""

from __future__ import annotations

import mmap
import struct
import threading
import time

from gateway.scsi.sense import BUSY, GOOD, Result
from gateway.tcmu.device import RingDevice
from gateway.tcmu.doorbell import EventfdDoorbell
from gateway.tcmu.simkernel import SimKernel
from gateway.tcmu.transfer import IovecTransfer


class Gated:
    """A logical unit whose commands wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    def execute(self, cdb: bytes, xfer: IovecTransfer, *, nowait: bool = False) -> Result:
        self.started.release()
        self.gate.wait(30)
        return Result(GOOD)


def tur() -> bytes:
    return bytes(6)


def write10(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0)


def device(lu: Gated) -> tuple[SimKernel, RingDevice]:
    k = SimKernel(cmdr_size=64 << 10, data_size=1 << 20)
    dev = RingDevice(memoryview(mmap.mmap(k.memfd, k.size)), EventfdDoorbell(k.to_handler, k.to_kernel), lu, workers=2,
                     name="stop").start()
    return k, dev


def test_stop_lets_in_flight_commands_finish() -> None:
    lu = Gated()
    k, dev = device(lu)
    cmd = k.queue(tur())
    assert lu.started.acquire(timeout=5)
    threading.Timer(0.3, lu.gate.set).start()
    assert dev.stop(timeout=10)
    assert [(c.cmd_id, c.status) for c in k.reap()] == [(cmd, GOOD)]
    k.close()


def test_stop_fails_unfinished_commands_with_busy_after_the_timeout() -> None:
    lu = Gated()
    k, dev = device(lu)
    first = k.queue(write10(0), bytes(512))
    assert lu.started.acquire(timeout=5)
    blocked = k.queue(write10(0), bytes(512))  # overlaps the first: waits for it
    time.sleep(0.2)
    start = time.monotonic()
    assert not dev.stop(timeout=0.5)
    assert time.monotonic() - start < 3
    assert sorted((c.cmd_id, c.status) for c in k.reap()) == [(first, BUSY), (blocked, BUSY)]
    unfetched = k.queue(tur())  # after the stop: left for the kernel / the next handler
    time.sleep(0.2)
    assert k.reap() == [] and unfetched in k.inflight
    lu.gate.set()  # the abandoned worker finishes: nothing more reaches the ring
    time.sleep(0.2)
    assert k.reap() == []
