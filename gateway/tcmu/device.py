"""Serving one TCMU device: a ring thread that fetches and completes, workers that execute.

The ring thread owns ``cmd_tail``: it reads the kernel's wake-up count
first, then fetches every new entry, hands commands to a pool of workers
(what may wait for the medium runs there, so the ring keeps moving), and
completes what is finished in batches, one tail update and one kick per batch.  A
command that overlaps an earlier unfinished one waits for it when either
writes (:mod:`.ordering`).  A READ that waits for no other command is first
tried in the ring thread without waiting for the medium (``nowait``: the page
cache's data, or a worker runs it): a hand-off (a thread switch, the GIL, an
eventfd wake-up) costs more than such a read, and the GIL keeps workers from
decrypting side by side anyway.  Those READs are queued in a read batch and
read together at the end of the fetch (one decryption pass for all: see
:mod:`gateway.scsi.batch`); one the page cache cannot serve goes to a worker.
Every :data:`PUBLISH_BYTES` read so, what is finished is completed, so that
large reads do not wait for a whole fetch.
With no workers the ring thread runs each command as it fetches it, in
arrival order, so nothing needs ordering.  FUA and SYNCHRONIZE CACHE reach the
logical unit as such.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
from typing import AbstractSet, Protocol

from ..backstore import WouldBlock
from ..scsi.batch import ReadBatch
from ..scsi.sense import BUSY, HARDWARE_FAILURE
from .doorbell import EventfdDoorbell, UioDoorbell
from .ordering import Access, access
from .ring import Command, Ring, RingError, TaskManagement
from .transfer import IovecTransfer
from .workers import Workers, pin_thread

_log = logging.getLogger(__name__)


class Reply(Protocol):
    status: int
    sense: bytes
    data_in_len: int


#: bytes read in the ring thread after which it completes what is finished mid-batch
PUBLISH_BYTES = 256 * 1024


class Executor(Protocol):
    """A logical unit: runs one CDB against a transfer (thread-safe; raises nothing
    but :class:`~gateway.backstore.WouldBlock`, and that only when ``nowait``).

    One that also offers ``read_batch()`` (:class:`~gateway.scsi.LogicalUnit`) gets
    the READs the ring thread tries queued in a batch (see :mod:`gateway.scsi.batch`)."""

    def execute(self, cdb: bytes, xfer: IovecTransfer, *,
                nowait: bool | ReadBatch = False) -> Reply: ...


class RingDevice:
    """One ``user:evlu`` device: its mapping, its doorbell, its logical unit."""

    def __init__(self, mem: memoryview, doorbell: UioDoorbell | EventfdDoorbell,
                 lu: Executor, *, workers: int = 4, name: str = "",
                 cpus: AbstractSet[int] | None = None) -> None:
        """``cpus``: where the ring thread and the workers run (None: anywhere).
        One CPU for them all makes each hand-off a switch on that CPU, not a
        wake-up of another (a worker's 4 KiB write then costs half the CPU time
        on the build machine), but the device's XTS can no longer run on two
        CPUs at once (which large encrypted I/O on slow AES needs)."""
        self.ring = Ring(mem)
        if not self.ring.out_of_order:
            raise RingError("this kernel lacks out-of-order TCMU completion")
        self.mem = self.ring.mem
        self.doorbell = doorbell
        self.lu = lu
        self.name = name
        # workers=0 runs every command in the ring thread (no hand-offs; for page-cache
        # or memory backstores where a command never waits long)
        self.cpus = cpus
        self._pool = Workers(workers, self._work, f"tcmu-{name or 'dev'}",
                             cpus) if workers else None
        self._launched: list[Command] = []  # for the pool, handed over once per fetch
        # READs tried in the ring thread are read and decrypted together (a logical
        # unit that offers read_batch(), see gateway.scsi.batch); queued: their replies
        make_batch = getattr(lu, "read_batch", None) if workers else None
        self._batch = make_batch() if make_batch is not None else None
        self._queued: list[tuple[Command, Reply]] = []
        self._read_len = self.ring.read_len_supported
        self._finished: collections.deque[tuple[Command, Reply]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._woken = False  # a worker has written _wake since the ring thread last looked
        self._running: dict[int, Access | None] = {}  # launched on workers, not completed
        self._writing = 0  # how many of them write
        self._waiting: collections.deque[tuple[Command, Access]] = collections.deque()
        self._stop = False
        self._abandon = False  # stop() timed out: fail what is unfinished
        self._thread: threading.Thread | None = None
        self.gone = False  # the kernel removed the device (EIO on the doorbell)
        self.commands = 0
        self.inline = 0  # commands a pool device ran in the ring thread
        self._inline_bytes = 0  # read there since the last completion

    def start(self) -> RingDevice:
        self._thread = threading.Thread(target=self._run, name=f"tcmu-ring-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the ring thread runs (not after a stop or a broken ring)."""
        return self._thread is not None and self._thread.is_alive()

    def request_stop(self) -> None:
        """Stop fetching (entries left in the ring are the kernel's to time out, or the
        next handler's to reset); what is in flight still completes."""
        self._stop = True
        os.eventfd_write(self._wake, 1)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop fetching, finish and complete what is in flight, and stop.

        After ``timeout`` seconds, commands still unfinished are completed with
        BUSY (the initiator retries them) and their workers are abandoned: the
        mapping must then stay mapped until the process exits.  Returns whether
        every command finished."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abandon = True
                os.eventfd_write(self._wake, 1)
                self._thread.join()
        if self._abandon:
            return False  # a late worker may still signal the eventfd: keep it open
        os.close(self._wake)
        self.ring.close()
        return True

    # -- the ring thread ------------------------------------------------------

    def _run(self) -> None:
        if self.cpus is not None:
            pin_thread(self.cpus)
        poller = select.poll()
        poller.register(self.doorbell.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while not (self._stop and (self.gone or self._abandon or
                                       not (self._running or self._waiting))):
                for fd, _event in poller.poll(1000):
                    if fd == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                        # after the read (a worker's write is never consumed unseen) and
                        # before _complete takes what the workers finished
                        self._woken = False
                    elif not self.doorbell.ack():
                        self.gone = True
                        self._stop = True
                    elif not self._stop:
                        self._fetch()
                self._complete()
            if self._abandon and not self.gone:
                self._fail_unfinished()
        except RingError:
            _log.exception("TCMU device %s: ring broken; stopping (the device needs a reset)",
                           self.name)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=not self._abandon)

    def _fail_unfinished(self) -> None:
        """Complete what finished, then BUSY for everything else fetched."""
        waiting, self._waiting = [cmd for cmd, _ in self._waiting], collections.deque()
        self._complete()
        unfinished = [*self._running, *(cmd.cmd_id for cmd in waiting)]
        _log.error("TCMU device %s: %d command(s) unfinished at stop: completed with BUSY",
                   self.name, len(unfinished))
        for cmd_id in unfinished:
            self.ring.complete(cmd_id, BUSY)
        self._running.clear()
        self.ring.skip_to_cursor()
        self.doorbell.kick()

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
            elif self._pool is None:
                self._finished.append((item, self._execute(item)))
            else:
                span = access(item.cdb)
                if span is not None and (self._waiting or self._blocked(span)):
                    self._waiting.append((item, span))
                elif span is None or span.writes or not self._inline(item, span):
                    self._launch(item, span)
                elif self._inline_bytes >= PUBLISH_BYTES:
                    self._complete()
        self._run_batch()
        self._hand_over()

    def _inline(self, cmd: Command, span: Access) -> bool:
        """Run a READ here if its data is at hand (or queue it in the batch); False: a
        worker must."""
        xfer = IovecTransfer(self.mem, cmd.iovecs)
        batch = self._batch
        queued = len(batch) if batch is not None else 0
        reply = self._execute(cmd, xfer, nowait=batch if batch is not None else True)
        if reply is None:
            return False
        if batch is not None and len(batch) > queued:
            self._queued.append((cmd, reply))
            self._running[cmd.cmd_id] = span  # until read: later writes to it wait
        else:
            self._finished.append((cmd, reply))
            self.inline += 1
        self._inline_bytes += xfer.length
        return True

    def _run_batch(self) -> None:
        """Read the queued READs; those the page cache could not serve go to a worker."""
        if not self._queued:
            return
        assert self._batch is not None
        queued, self._queued = self._queued, []
        try:
            done = self._batch.run()
        except Exception:  # noqa: BLE001 - a worker runs them again and reports
            _log.exception("TCMU device %s: batched read failed", self.name)
            done = [False] * len(queued)
        for (cmd, reply), read in zip(queued, done):
            if read:
                self._finished.append((cmd, reply))
                self.inline += 1
            else:
                self._launch(cmd, self._running[cmd.cmd_id])

    def _blocked(self, span: Access) -> bool:
        """Whether ``span`` overlaps a running or waiting command and either writes."""
        if not (span.writes or self._writing) and not self._waiting:
            return False  # reads among reads: the common case, decided without a scan
        return any(other is not None and span.conflicts(other)
                   for other in self._running.values()) or \
            any(span.conflicts(w) for _, w in self._waiting)

    def _launch(self, cmd: Command, span: Access | None) -> None:
        self._running[cmd.cmd_id] = span
        if span is not None and span.writes:
            self._writing += 1
        self._launched.append(cmd)

    def _hand_over(self) -> None:
        """Give the pool what was launched since the last hand-over, in one batch."""
        if self._launched:
            assert self._pool is not None
            self._pool.submit(self._launched)
            self._launched = []

    def _execute(self, cmd: Command, xfer: IovecTransfer | None = None, *,
                 nowait: bool | ReadBatch = False) -> Reply | None:
        """The reply to ``cmd``; None when ``nowait`` and it would have waited."""
        if xfer is None:
            xfer = IovecTransfer(self.mem, cmd.iovecs)
        try:
            reply: Reply = self.lu.execute(cmd.cdb, xfer, nowait=nowait)
            if not self._read_len and reply.data_in_len < xfer.length:
                xfer.zero_from(reply.data_in_len)
        except Exception as exc:  # noqa: BLE001 - a command never takes the device down
            if nowait and isinstance(exc, WouldBlock):
                return None
            _log.exception("TCMU device %s: command %d failed", self.name, cmd.cmd_id)
            reply = HARDWARE_FAILURE
        return reply

    def _work(self, cmd: Command) -> None:
        """A worker: run ``cmd``, queue its reply, wake the ring thread unless already woken."""
        self._finished.append((cmd, self._execute(cmd)))
        if not self._woken:
            self._woken = True
            os.eventfd_write(self._wake, 1)

    def _complete(self) -> None:
        self._run_batch()  # mid-fetch: what is queued completes now
        self._hand_over()  # and the workers start on what is launched
        self._inline_bytes = 0
        finished = self._finished
        if not finished:
            return
        while finished:
            replies = []
            while finished:
                cmd, reply = finished.popleft()
                replies.append((cmd.cmd_id, reply.status, reply.sense, reply.data_in_len))
                if self._running:
                    span = self._running.pop(cmd.cmd_id, None)
                    if span is not None and span.writes:
                        self._writing -= 1
            self.ring.complete_all(replies)
            if self._waiting:
                self._release()  # READs it runs here finish now: complete them too
                self._run_batch()
                self._hand_over()
        self.ring.skip_to_cursor()
        self.doorbell.kick()

    def _release(self) -> None:
        """Start waiting commands that no longer overlap anything before them."""
        waiting, self._waiting = self._waiting, collections.deque()
        for cmd, span in waiting:  # _blocked sees those still waiting before this one
            if self._blocked(span):
                self._waiting.append((cmd, span))
            elif span.writes or not self._inline(cmd, span):
                self._launch(cmd, span)
