"""A simulated target_core_user: queues SCSI commands on a real shared mapping.

It follows ``drivers/target/target_core_user.c`` (Linux 6.1) step by step, so
the handler's ring code can be driven and checked without LIO:

* ``queue``: data blocks of 4 KiB are allocated (lowest free first, or in a
  shuffled order to force several iovecs), the entry size is
  ``max(48 + 16 * blocks, 112)`` rounded to 8 plus the CDB rounded to 8, a PAD
  entry fills the end of the ring when the entry does not fit there, one byte
  of the ring always stays free (space counted from the last *reaped*
  position), data-out is copied into the data area, the CDB goes right after
  the base size, then ``cmd_head`` advances and the handler is woken;
* ``reap``: like ``tcmu_handle_completions``, walk from the last reaped
  position to ``cmd_tail``, skip PAD/TMR entries, look every CMD slot's
  ``cmd_id`` up (an unknown id breaks the ring), copy ``read_len`` (or all)
  bytes of data-in back, free the blocks and the id.

The mapping is a memfd the handler maps by itself, the wake-ups are eventfds.
Unallocated data blocks hold a canary, checked on every reap, so a handler
writing outside its iovecs is caught (``canaries=False`` skips that for
benchmarks).
"""

from __future__ import annotations

import heapq
import mmap
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from . import ring as r

BLOCK = 4096
_CANARY = b"\xde\xad\xbe\xef" * (BLOCK // 4)


class RingFull(Exception):
    """No ring space or data blocks: the kernel would queue the command (qfull)."""


class RingBroken(AssertionError):
    """The handler broke the ring as the kernel would detect it."""


@dataclass
class Completion:
    """What the kernel got back for one command."""

    cmd_id: int
    status: int
    sense: bytes
    data_in: bytes
    read_len: int | None


@dataclass
class _Inflight:
    cdb: bytes
    blocks: list[int]
    iovecs: list[tuple[int, int]]
    data_in_len: int
    extra: dict[str, object] = field(default_factory=dict)


def _runs(blocks: list[int], length: int, data_off: int) -> list[tuple[int, int]]:
    """Iovecs for ``length`` bytes over ``blocks``: one per run of consecutive blocks
    (every block is whole but the last; found with one pass over block pairs)."""
    if not blocks:
        return []
    starts = [0, *(i for i, (a, b) in enumerate(zip(blocks, blocks[1:]), 1) if b != a + 1)]
    ends = [*starts[1:], len(blocks)]
    return [(data_off + blocks[s] * BLOCK, min((e - s) * BLOCK, length - s * BLOCK))
            for s, e in zip(starts, ends)]


class SimKernel:
    """One simulated TCMU device."""

    def __init__(self, cmdr_size: int = 1 << 20, data_size: int = 16 << 20, *,
                 flags: int = r.FLAG_OOOC | r.FLAG_READ_LEN,
                 rng: random.Random | None = None, canaries: bool = True) -> None:
        if cmdr_size % 8 or data_size % BLOCK:
            raise ValueError("cmdr_size must be a multiple of 8, data_size of 4096")
        self.cmdr_off, self.cmdr_size = r.MAILBOX_SIZE, cmdr_size
        self.data_off = self.cmdr_off + cmdr_size
        self.size = self.data_off + data_size
        self.memfd = os.memfd_create("tcmu-sim", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.size)
        self.map = mmap.mmap(self.memfd, self.size)
        self.mem = memoryview(self.map)
        self._words = self.mem[:r.MAILBOX_SIZE].cast("I")  # whole-word head/tail access
        struct.pack_into("<HHII", self.mem, 0, r.VERSION, flags, self.cmdr_off, cmdr_size)
        self.nblocks = data_size // BLOCK
        self.free = set(range(self.nblocks))
        self._lowest = list(range(self.nblocks))  # heap of free blocks: lowest first
        self.canaries = canaries  # off for benchmarks: checking costs a pass over the data area
        for dbi in self.free if canaries else ():
            self._block(dbi)[:] = _CANARY
        self.rng = rng  # None: lowest free blocks first, as the kernel does
        self.head = 0
        self.last_cleaned = 0
        self.inflight: dict[int, _Inflight] = {}
        self._next_id = 1
        self.to_handler = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.to_kernel = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pads = 0

    def close(self) -> None:
        self._words.release()
        self.mem.release()
        self.map.close()
        for fd in (self.memfd, self.to_handler, self.to_kernel):
            os.close(fd)

    def _block(self, dbi: int) -> memoryview:
        start = self.data_off + dbi * BLOCK
        return self.mem[start:start + BLOCK]

    @property
    def tail(self) -> int:
        return int(self._words[64 // 4])

    def _set_head(self, value: int) -> None:
        self.head = value
        self._words[12 // 4] = value  # one 4-byte store, as the kernel's WRITE_ONCE

    def _space(self) -> int:
        used = self.head - self.last_cleaned
        if used < 0:
            used += self.cmdr_size
        return self.cmdr_size - used - 1

    def _alloc_id(self) -> int:
        for _ in range(0xFFFF):
            cmd_id = self._next_id
            self._next_id = self._next_id % 0xFFFF + 1
            if cmd_id not in self.inflight:
                return cmd_id
        raise RingFull("no free command id")

    def _reserve(self, size: int) -> int:
        """Room for a ``size``-byte entry at the head (a PAD first if the end of the ring
        is too short, as the kernel does); the zeroed entry's offset in the mapping."""
        to_end = self.cmdr_size - self.head
        if self._space() < (size if to_end >= size else size + to_end):
            raise RingFull("ring full")
        if to_end < size:
            struct.pack_into("<IHBB", self.mem, self.cmdr_off + self.head, to_end | r.OP_PAD,
                             0, 0, 0)
            self._set_head(0)
            self.pads += 1
        entry = self.cmdr_off + self.head
        self.mem[entry:entry + size] = bytes(size)
        return entry

    def queue(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0, *,
              tamper: Callable[[memoryview, int], None] | None = None) -> int:
        """Queue one command; returns its cmd_id.  RingFull when it does not fit now.

        ``tamper(mem, entry_offset)`` may damage the entry before it is published
        (tests of what a handler does with a malformed entry)."""
        length = max(len(data_out), data_in_len)
        nblocks = -(-length // BLOCK)
        if nblocks > len(self.free):
            raise RingFull("data area full")
        base = max(r.IOV_OFFSET + r.IOV_SIZE * nblocks, r.ENTRY_SIZE)
        base = -(-base // 8) * 8
        cdb_len = r.scsi_cdb_length(cdb)
        cdb = cdb[:cdb_len] + bytes(max(0, cdb_len - len(cdb)))
        size = base + -(-cdb_len // 8) * 8
        cmd_id = self._alloc_id()
        entry = self._reserve(size)
        if self.rng is None:
            blocks = [heapq.heappop(self._lowest) for _ in range(nblocks)]
        else:
            blocks = self.rng.sample(sorted(self.free), nblocks)
            self._lowest = [b for b in self._lowest if b not in set(blocks)]
            heapq.heapify(self._lowest)
        self.free.difference_update(blocks)
        iovecs = _runs(blocks, length, self.data_off)
        for i, (base_off, iov_len) in enumerate(iovecs):
            struct.pack_into("<QQ", self.mem, entry + r.IOV_OFFSET + r.IOV_SIZE * i, base_off,
                             iov_len)
        pos = 0
        for base_off, iov_len in iovecs:
            chunk = data_out[pos:pos + iov_len]
            self.mem[base_off:base_off + len(chunk)] = chunk
            pos += iov_len
        struct.pack_into("<IHBBIII4xQ", self.mem, entry, size | r.OP_CMD, cmd_id, 0, 0,
                         len(iovecs), 0, 0, entry + base)
        self.mem[entry + base:entry + base + cdb_len] = cdb
        self.inflight[cmd_id] = _Inflight(bytes(cdb), blocks, iovecs, data_in_len)
        if tamper is not None:
            tamper(self.mem, entry)
        self._set_head((self.head + size) % self.cmdr_size)
        os.eventfd_write(self.to_handler, 1)
        return cmd_id

    def tmr(self, tmr_type: int, cmd_ids: list[int]) -> None:
        """Queue a TMR entry (as with ``tmr_notification=1``)."""
        size = max(-(-(32 + 2 * len(cmd_ids)) // 8) * 8, r.ENTRY_SIZE)
        entry = self._reserve(size)
        struct.pack_into("<IHBBII", self.mem, entry, size | r.OP_TMR, 0, 0, 0, tmr_type,
                         len(cmd_ids))
        for i, cmd_id in enumerate(cmd_ids):
            struct.pack_into("<H", self.mem, entry + 32 + 2 * i, cmd_id)
        self._set_head((self.head + size) % self.cmdr_size)
        os.eventfd_write(self.to_handler, 1)

    def reap(self, *, collect: bool = True) -> list[Completion]:
        """Process completions up to ``cmd_tail`` as the kernel does.

        ``collect=False`` skips copying data-in out (benchmarks: the kernel's own
        copy is C, this one would be the bottleneck)."""
        try:
            os.eventfd_read(self.to_kernel)
        except BlockingIOError:
            pass
        tail = self.tail
        if tail >= self.cmdr_size or tail % 8:
            raise RingBroken(f"cmd_tail {tail} is not an entry offset")
        done: list[Completion] = []
        while self.last_cleaned != tail:
            entry = self.cmdr_off + self.last_cleaned
            len_op, cmd_id, _kflags, uflags = struct.unpack_from("<IHBB", self.mem, entry)
            op, size = len_op & 7, len_op & ~7
            if size < 8 or self.last_cleaned + size > self.cmdr_size:
                raise RingBroken(f"entry at {self.last_cleaned} has length {size}")
            if op in (r.OP_PAD, r.OP_TMR):
                self.last_cleaned = (self.last_cleaned + size) % self.cmdr_size
                continue
            if op != r.OP_CMD:
                raise RingBroken(f"entry at {self.last_cleaned} has op {op}")
            cmd = self.inflight.pop(cmd_id, None)
            if cmd is None:
                raise RingBroken(f"cmd_id {cmd_id} not found, ring is broken")
            status, read_len = struct.unpack_from("<BxxxI", self.mem, entry + 8)
            sense = b""  # the kernel reads the sense buffer of a CHECK CONDITION only
            if status == r.CHECK_CONDITION:
                sense = bytes(self.mem[entry + 16:entry + 16 + r.SENSE_SIZE])
            valid_len: int | None = None
            if uflags & r.UFLAG_READ_LEN and cmd.data_in_len:  # only data-in commands use it
                valid_len = min(read_len, cmd.data_in_len)  # the kernel caps it, too
            want = cmd.data_in_len if valid_len is None else valid_len
            data = bytearray()
            for base_off, iov_len in cmd.iovecs if collect else ():
                n = min(iov_len, want - len(data))
                if n <= 0:
                    break
                data += self.mem[base_off:base_off + n]
            for dbi in cmd.blocks if self.canaries else ():
                self._block(dbi)[:] = _CANARY
            self.free.update(cmd.blocks)
            for dbi in cmd.blocks:
                heapq.heappush(self._lowest, dbi)
            done.append(Completion(cmd_id, status, sense, bytes(data), valid_len))
            self.last_cleaned = (self.last_cleaned + size) % self.cmdr_size
        if self.canaries:
            self.check_canaries()
        return done

    def check_canaries(self) -> None:
        """Every free data block still holds the canary (nobody wrote outside iovecs)."""
        for dbi in self.free:
            if self._block(dbi) != _CANARY:
                raise RingBroken(f"data block {dbi} (not in any iovec) was written")

    def wait(self, timeout: float) -> bool:
        """Wait for the handler's kick (or timeout); True if kicked."""
        import select
        readable, _, _ = select.select([self.to_kernel], [], [], timeout)
        return bool(readable)
