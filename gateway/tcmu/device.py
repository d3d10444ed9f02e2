"""Serving one TCMU device: a ring thread that fetches and completes, workers that execute.

The ring thread owns ``cmd_tail``: it reads the kernel's wake-up count
first, then fetches every new entry, hands commands to a pool of workers
(I/O and crypto run there, so the ring keeps moving), and completes what the
workers finished in batches, kicking the kernel once per batch.  A command
that overlaps an earlier unfinished one waits for it when either writes
(:mod:`.ordering`).  FUA and SYNCHRONIZE CACHE reach the logical unit as such.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from ..scsi.sense import HARDWARE_FAILURE
from .doorbell import EventfdDoorbell, UioDoorbell
from .ordering import Access, access
from .ring import Command, Ring, RingError, TaskManagement
from .transfer import IovecTransfer

_log = logging.getLogger(__name__)


class Reply(Protocol):
    status: int
    sense: bytes
    data_in_len: int


class Executor(Protocol):
    """A logical unit: runs one CDB against a transfer (thread-safe, never raises)."""

    def execute(self, cdb: bytes, xfer: IovecTransfer) -> Reply: ...


class RingDevice:
    """One ``user:evlu`` device: its mapping, its doorbell, its logical unit."""

    def __init__(self, mem: memoryview, doorbell: UioDoorbell | EventfdDoorbell,
                 lu: Executor, *, workers: int = 4, name: str = "") -> None:
        self.ring = Ring(mem)
        if not self.ring.out_of_order:
            raise RingError("this kernel lacks out-of-order TCMU completion")
        self.mem = self.ring.mem
        self.doorbell = doorbell
        self.lu = lu
        self.name = name
        # workers=0 runs every command in the ring thread (no hand-offs; for page-cache
        # or memory backstores where a command never waits long)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"tcmu-{name or 'dev'}") \
            if workers else None
        self._finished: collections.deque[tuple[Command, Reply]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._running: dict[int, Access | None] = {}
        self._waiting: collections.deque[tuple[Command, Access]] = collections.deque()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.gone = False  # the kernel removed the device (EIO on the doorbell)
        self.commands = 0

    def start(self) -> RingDevice:
        self._thread = threading.Thread(target=self._run, name=f"tcmu-ring-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop fetching, finish and complete what is in flight, and stop."""
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join()
        os.close(self._wake)
        self.ring.close()

    # -- the ring thread ------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.doorbell.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while not (self._stop and (self.gone or not (self._running or self._waiting))):
                for fd, _event in poller.poll(1000):
                    if fd == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                    elif not self.doorbell.ack():
                        self.gone = True
                        self._stop = True
                    elif not self._stop:
                        self._fetch()
                self._complete()
        except RingError:
            _log.exception("TCMU device %s: ring broken; stopping (the device needs a reset)",
                           self.name)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _fetch(self) -> None:
        for item in self.ring.fetch():
            if isinstance(item, TaskManagement):
                _log.info("TCMU device %s: task management %d for %s", self.name,
                          item.tmr_type, item.cmd_ids)
                continue
            self.commands += 1
            if item.problem:
                _log.error("TCMU device %s: command %d unusable: %s", self.name, item.cmd_id,
                           item.problem)
                self._finished.append((item, HARDWARE_FAILURE))
                continue
            span = access(item.cdb)
            if span is not None and (self._blocked(span) or
                                     any(span.conflicts(w) for _, w in self._waiting)):
                self._waiting.append((item, span))
            else:
                self._launch(item, span)

    def _blocked(self, span: Access) -> bool:
        return any(other is not None and span.conflicts(other)
                   for other in self._running.values())

    def _launch(self, cmd: Command, span: Access | None) -> None:
        self._running[cmd.cmd_id] = span
        if self._pool is None:
            self._work(cmd)
        else:
            self._pool.submit(self._work, cmd)

    def _work(self, cmd: Command) -> None:
        xfer = IovecTransfer(self.mem, cmd.iovecs)
        try:
            reply: Reply = self.lu.execute(cmd.cdb, xfer)
            if not self.ring.read_len_supported and reply.data_in_len < xfer.length:
                xfer.zero_from(reply.data_in_len)
        except Exception:  # noqa: BLE001 - a command never takes the device down
            _log.exception("TCMU device %s: command %d failed", self.name, cmd.cmd_id)
            reply = HARDWARE_FAILURE
        self._finished.append((cmd, reply))
        if self._pool is not None:
            os.eventfd_write(self._wake, 1)

    def _complete(self) -> None:
        count = 0
        while self._finished:
            cmd, reply = self._finished.popleft()
            self.ring.complete(cmd.cmd_id, reply.status, reply.sense, reply.data_in_len)
            self._running.pop(cmd.cmd_id, None)
            count += 1
        if count:
            self._release()
            self.ring.skip_to_cursor()
            self.doorbell.kick()

    def _release(self) -> None:
        """Start waiting commands that no longer overlap anything before them."""
        still: collections.deque[tuple[Command, Access]] = collections.deque()
        for cmd, span in self._waiting:
            if self._blocked(span) or any(span.conflicts(w) for _, w in still):
                still.append((cmd, span))
            else:
                self._launch(cmd, span)
        self._waiting = still
