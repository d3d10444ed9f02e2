"""The TCMU ring and device loop against the simulated kernel (a real shared mapping).

The logical unit here is a minimal READ/WRITE disk over a bytearray: these
tests isolate the ring layer (entries, wrap, PAD, TMR, out-of-order
completion, iovec scatter/gather, ordering); the SCSI layer over real
volumes is tested through the same path in test_tcmu_lu.py.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import threading
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.backstore import WouldBlock
from gateway.scsi.batch import ReadBatch
from gateway.tcmu import ring as r
from gateway.tcmu.device import PUBLISH_BYTES, RingDevice
from gateway.tcmu.doorbell import EventfdDoorbell
from gateway.tcmu.ordering import access
from gateway.tcmu.simkernel import Completion, RingBroken, RingFull, SimKernel
from gateway.tcmu.transfer import IovecTransfer

BS = 512


@dataclass
class Reply:
    status: int
    sense: bytes = b""
    data_in_len: int = 0


class DiskLU:
    """READ(10)/WRITE(10) over a bytearray, with jitter so completions reorder.

    Asked not to wait (a READ the ring thread tries first), it refuses at random
    (``miss``: how often), as reads of data not in the page cache would."""

    def __init__(self, blocks: int, jitter: float = 0.0, seed: int = 0,
                 miss: float = 0.5) -> None:
        self.disk = bytearray(blocks * BS)
        self.jitter = jitter
        self.miss = miss
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.seen: list[bytes] = []
        self.refused = self.served_without_waiting = 0
        self.largest_try = 0  # the longest buffer of a command tried without waiting

    def execute(self, cdb: bytes, xfer: IovecTransfer, *, nowait: bool = False) -> Reply:
        with self.lock:
            if nowait:
                self.largest_try = max(self.largest_try, xfer.length)
                if self.rng.random() < self.miss:
                    self.refused += 1
                    raise WouldBlock
                self.served_without_waiting += 1
            self.seen.append(cdb)
            delay = 0.0 if nowait else self.rng.random() * self.jitter
        if delay:
            time.sleep(delay)
        if len(cdb) == 10 and cdb[0] in (0x28, 0x2A):
            lba, n = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
            if (lba + n) * BS > len(self.disk) or n * BS > xfer.length:
                return Reply(2, bytes([0x70, 0, 5, 0, 0, 0, 0, 10] + [0] * 4 + [0x21, 0, 0, 0, 0, 0]))
            if cdb[0] == 0x28:
                xfer.data_in(self.disk[lba * BS:(lba + n) * BS])
                return Reply(0, b"", n * BS)
            self.disk[lba * BS:(lba + n) * BS] = xfer.data_out(n * BS)
            return Reply(0)
        return Reply(2, bytes([0x70, 0, 5, 0, 0, 0, 0, 10] + [0] * 4 + [0x20, 0, 0, 0, 0, 0]))


class BatchingDiskLU(DiskLU):
    """A DiskLU whose no-wait READs queue in a real ReadBatch: the batch's read
    refuses each at random (``miss``), and a worker then runs it."""

    def __init__(self, blocks: int, jitter: float = 0.0, seed: int = 0,
                 miss: float = 0.5) -> None:
        super().__init__(blocks, jitter, seed, miss)
        self.batches: list[int] = []

    def read_batch(self) -> ReadBatch:
        return ReadBatch(self)

    def execute(self, cdb: bytes, xfer: IovecTransfer, *,
                nowait: bool | ReadBatch = False) -> Reply:
        if isinstance(nowait, ReadBatch) and cdb[0] == 0x28:
            lba, n = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
            view = xfer.in_view(n * BS)
            if (lba + n) * BS <= len(self.disk) and view is not None:
                with self.lock:
                    self.largest_try = max(self.largest_try, xfer.length)
                nowait.add(lba, view)
                return Reply(0, b"", n * BS)
        return super().execute(cdb, xfer, nowait=bool(nowait))

    def read_cached(self, requests: list[tuple[int, memoryview]]) -> list[bool]:
        done = []
        with self.lock:
            self.batches.append(len(requests))
            for lba, view in requests:
                if self.rng.random() < self.miss:
                    self.refused += 1
                    view[:] = b"\xee" * len(view)  # undefined: the worker must overwrite it
                    done.append(False)
                    continue
                self.served_without_waiting += 1
                view[:] = self.disk[lba * BS:lba * BS + len(view)]
                done.append(True)
        return done


def rw10(op: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, n, 0)


def handler_ring(k: SimKernel) -> tuple[r.Ring, mmap.mmap]:
    m = mmap.mmap(k.memfd, k.size)
    return r.Ring(memoryview(m)), m


def test_one_read_round_trip() -> None:
    k = SimKernel(cmdr_size=4096, data_size=1 << 20)
    ring, _m = handler_ring(k)
    cmd_id = k.queue(rw10(0x28, 0, 8), data_in_len=4096)
    (cmd,) = ring.fetch()
    assert isinstance(cmd, r.Command) and cmd.cmd_id == cmd_id and cmd.cdb == rw10(0x28, 0, 8)
    assert cmd.length == 4096 and cmd.iovecs[0].offset >= k.data_off
    IovecTransfer(ring.mem, cmd.iovecs).data_in(b"\x42" * 1000)
    ring.complete(cmd.cmd_id, 0, b"", 1000)
    (done,) = k.reap()
    assert done == Completion(cmd_id, 0, b"", b"\x42" * 1000, 1000)


def test_pad_at_the_end_of_the_ring_and_tail_skips_it() -> None:
    k = SimKernel(cmdr_size=512, data_size=128 << 10)
    ring, _m = handler_ring(k)
    ids = []
    for _ in range(3):  # 6 data blocks: 48 + 6 * 16 + 16 = 160 bytes each, 480 in all
        ids.append(k.queue(rw10(0x28, 0, 48), data_in_len=6 * 4096))
    cmds = ring.fetch()
    for c in reversed(cmds):  # out of order
        ring.complete(c.cmd_id, 0, b"", 512)
    assert {c.cmd_id for c in k.reap()} == set(ids)
    ids.append(k.queue(rw10(0x28, 0, 48), data_in_len=6 * 4096))
    assert k.pads == 1 and k.head == 160  # 32 bytes of PAD, then the entry at 0
    (cmd,) = ring.fetch()
    ring.complete(cmd.cmd_id, 0, b"", 512)
    assert [c.cmd_id for c in k.reap()] == [ids[-1]]
    assert ring.tail == 160


def test_ring_full_keeps_one_byte_free() -> None:
    k = SimKernel(cmdr_size=512, data_size=64 << 10)
    for _ in range(3):
        k.queue(rw10(0x28, 0, 1), data_in_len=512)
    with pytest.raises(RingFull):  # 128 left, but one byte must stay free
        k.queue(rw10(0x28, 0, 1), data_in_len=512)


def test_tmr_entries_are_skipped_and_reported() -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    ring, _m = handler_ring(k)
    a = k.queue(rw10(0x28, 0, 1), data_in_len=512)
    k.tmr(1, [a])
    b = k.queue(rw10(0x28, 0, 1), data_in_len=512)
    items = ring.fetch()
    assert [type(i).__name__ for i in items] == ["Command", "TaskManagement", "Command"]
    assert items[1].cmd_ids == (a,)
    ring.complete(b, 0, b"", 0)
    ring.complete(a, 0, b"", 0)  # the second CMD slot is after the TMR: skipped
    assert {c.cmd_id for c in k.reap()} == {a, b}


def test_completing_an_unknown_id_breaks_the_ring_as_the_kernel_sees_it() -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    ring, _m = handler_ring(k)
    k.queue(rw10(0x28, 0, 1), data_in_len=512)
    ring.fetch()
    ring.complete(999, 0)
    with pytest.raises(RingBroken, match="not found"):
        k.reap()


def test_completion_never_passes_the_fetch_cursor() -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    ring, _m = handler_ring(k)
    k.queue(rw10(0x28, 0, 1), data_in_len=512)
    with pytest.raises(r.RingError):
        ring.complete(1, 0)  # not fetched yet


def _corrupt(k: SimKernel, offset: int, fmt: str, *values: int) -> None:
    struct.pack_into(fmt, k.mem, k.cmdr_off + offset, *values)


@pytest.mark.parametrize("what", ["length", "iovec", "cdb_off", "iov_cnt"])
def test_malformed_entries_are_refused_not_followed(what: str) -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    ring, _m = handler_ring(k)
    k.queue(rw10(0x2A, 0, 1), data_out=bytes(512))
    if what == "length":
        _corrupt(k, 0, "<I", 8000 | r.OP_CMD)  # would run past the end of the ring
        with pytest.raises(r.RingError, match="bad length"):
            ring.fetch()
        return
    if what == "iovec":
        _corrupt(k, r.IOV_OFFSET, "<QQ", 0, 4096)  # points at the mailbox
    elif what == "cdb_off":
        _corrupt(k, 24, "<Q", k.size + 100)
    else:
        _corrupt(k, 8, "<I", 1000)
        with pytest.raises(r.RingError):
            ring.fetch()
        return
    (cmd,) = ring.fetch()
    assert cmd.problem and cmd.iovecs == ()


def test_mailbox_checks() -> None:
    with pytest.raises(r.RingError, match="version"):
        r.Ring(bytearray(4096))
    buf = bytearray(4096)
    struct.pack_into("<HHII", buf, 0, 2, 1, 128, 1 << 20)
    with pytest.raises(r.RingError, match="does not fit"):
        r.Ring(buf)


def test_variable_length_cdb_is_copied_whole() -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    ring, _m = handler_ring(k)
    cdb = bytes([0x7F, 0, 0, 0, 0, 0, 0, 24]) + bytes(range(24))
    k.queue(cdb)
    (cmd,) = ring.fetch()
    assert cmd.cdb == cdb


def _serve(k: SimKernel, lu: DiskLU, workers: int = 4,
           cpus: set[int] | None = None) -> tuple[RingDevice, mmap.mmap]:
    m = mmap.mmap(k.memfd, k.size)
    dev = RingDevice(memoryview(m), EventfdDoorbell(k.to_handler, k.to_kernel), lu,
                     workers=workers, name="sim", cpus=cpus)
    return dev.start(), m


def run_mix(k: SimKernel, lu: DiskLU, ops: list[tuple[str, int, int]], blocks: int,
            timeout: float = 30.0, workers: int = 4,
            cpus: set[int] | None = None) -> dict[int, Completion]:
    """Queue ``ops`` (read/write, lba, n) as fast as the ring allows; check every result
    against a model that applies writes in queue order."""
    dev, _m = _serve(k, lu, workers, cpus)
    model = bytearray(blocks * BS)
    expected: dict[int, bytes] = {}
    done: dict[int, Completion] = {}
    pending = list(ops)
    rnd = random.Random(len(ops))
    deadline = time.monotonic() + timeout
    try:
        while pending or k.inflight:
            assert time.monotonic() < deadline, "simulated kernel timed out"
            while pending:
                kind, lba, n = pending[0]
                data = bytes(rnd.getrandbits(8) for _ in range(8)) * (n * BS // 8) \
                    if kind == "w" else b""
                try:
                    cid = k.queue(rw10(0x2A if kind == "w" else 0x28, lba, n), data_out=data,
                                  data_in_len=0 if kind == "w" else n * BS)
                except RingFull:
                    break
                pending.pop(0)
                if kind == "w":
                    model[lba * BS:(lba + n) * BS] = data
                    expected[cid] = b""
                else:
                    expected[cid] = bytes(model[lba * BS:(lba + n) * BS])
            k.wait(0.05)
            for c in k.reap():
                assert c.status == 0, c
                assert c.data_in == expected.pop(c.cmd_id), f"cmd {c.cmd_id} read stale data"
                done[c.cmd_id] = c
    finally:
        dev.stop()
    assert lu.disk == model
    return done


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cmdr_kib=st.sampled_from([1, 2, 4, 16]),
       shuffle=st.booleans(), workers=st.sampled_from([0, 4]))
def test_random_mixes_over_random_rings(seed: int, cmdr_kib: int, shuffle: bool,
                                        workers: int) -> None:
    rnd = random.Random(seed)
    blocks = 64
    ops = []
    for _ in range(120):
        n = rnd.choice([1, 1, 2, 8, 16, 33])
        ops.append((rnd.choice("rw"), rnd.randrange(0, blocks - n + 1), n))
    k = SimKernel(cmdr_size=cmdr_kib * 1024, data_size=256 << 10,
                  rng=random.Random(seed) if shuffle else None)
    try:
        run_mix(k, DiskLU(blocks, jitter=0.002, seed=seed), ops, blocks, workers=workers)
        assert k.last_cleaned == k.head
    finally:
        k.close()


def test_reads_run_in_the_ring_thread_unless_they_would_wait() -> None:
    """With workers, every READ is first tried in the ring thread without waiting (when
    it overlaps no unfinished write: else once released): served there when its data
    is at hand, else by a worker (DiskLU refuses half the tries); writes always go to
    a worker.  Every result still matches the in-order model."""
    rnd = random.Random(5)
    blocks = 600
    ops = []
    for _ in range(300):
        write = rnd.random() < 0.1
        n = rnd.choice([1, 8] if write else [1, 8, 8, 64, 256, 300])
        ops.append(("w" if write else "r", rnd.randrange(0, blocks - n + 1), n))
    k = SimKernel(cmdr_size=16 << 10, data_size=2 << 20)
    lu = DiskLU(blocks, jitter=0.001, seed=5)
    try:
        run_mix(k, lu, ops, blocks)
    finally:
        k.close()
    assert lu.served_without_waiting > 20 and lu.refused > 20
    assert lu.served_without_waiting + lu.refused == sum(1 for kind, _, _ in ops if kind == "r")
    assert lu.largest_try == 300 * BS


def test_reads_in_the_ring_thread_are_read_in_batches() -> None:
    """With a logical unit that offers read batches, the READs the ring thread tries
    are queued and read together once per fetch; those the batch could not read go
    to a worker.  Every result still matches the in-order model."""
    rnd = random.Random(7)
    blocks = 600
    ops = []
    for _ in range(400):
        write = rnd.random() < 0.1
        n = rnd.choice([1, 8] if write else [1, 8, 8, 64])
        ops.append(("w" if write else "r", rnd.randrange(0, blocks - n + 1), n))
    k = SimKernel(cmdr_size=16 << 10, data_size=2 << 20)
    lu = BatchingDiskLU(blocks, jitter=0.001, seed=7, miss=0.3)
    try:
        run_mix(k, lu, ops, blocks)
    finally:
        k.close()
    reads = sum(1 for kind, _, _ in ops if kind == "r")
    assert lu.served_without_waiting + lu.refused == reads  # each tried once
    assert lu.served_without_waiting > 50 and lu.refused > 20
    # in batches, but for READs whose buffer spans iovecs (no single view to read into)
    assert max(lu.batches) > 1 and reads // 2 < sum(lu.batches) <= reads


def test_reads_in_the_ring_thread_complete_every_publish_bytes() -> None:
    """Sixteen 64 KiB READs fetched in one batch and served in the ring thread are
    completed PUBLISH_BYTES at a time, not all at the end of the batch."""
    k = SimKernel(cmdr_size=64 << 10, data_size=2 << 20)
    lu = DiskLU(4096, miss=0.0)
    m = mmap.mmap(k.memfd, k.size)
    dev = RingDevice(memoryview(m), EventfdDoorbell(k.to_handler, k.to_kernel), lu, workers=4)
    batches: list[int] = []
    complete_all = dev.ring.complete_all

    def counted(replies: list[tuple[int, int, bytes, int | None]]) -> None:
        batches.append(len(replies))
        complete_all(replies)

    dev.ring.complete_all = counted  # type: ignore[method-assign]
    for i in range(16):  # all in the ring before the device looks
        k.queue(rw10(0x28, i * 128, 128), data_in_len=128 * BS)
    dev.start()
    try:
        got: list[Completion] = []
        deadline = time.monotonic() + 10
        while len(got) < 16 and time.monotonic() < deadline:
            k.wait(0.1)
            got += k.reap()
        assert len(got) == 16 and all(c.status == 0 for c in got)
    finally:
        dev.stop()
        k.close()
    assert dev.inline == 16 and sum(batches) == 16
    assert max(batches) == PUBLISH_BYTES // (128 * BS)


def test_overlapping_commands_run_in_arrival_order() -> None:
    """Writes to the same blocks with heavy jitter: the last queued one wins, every read
    sees exactly the writes queued before it."""
    ops = [("w", 0, 8), ("r", 4, 4), ("w", 2, 8), ("w", 0, 16), ("r", 0, 16)] * 30
    k = SimKernel(cmdr_size=64 << 10, data_size=1 << 20)
    try:
        run_mix(k, DiskLU(16, jitter=0.003), ops, 16)
    finally:
        k.close()


class WhereLU(DiskLU):
    """Records which thread ran each command, and on which CPUs it could run."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.where: set[tuple[str, frozenset[int]]] = set()

    def execute(self, cdb: bytes, xfer: IovecTransfer, *, nowait: bool = False) -> Reply:
        self.where.add((threading.current_thread().name.split("-")[1],
                        frozenset(os.sched_getaffinity(0))))
        return super().execute(cdb, xfer, nowait=nowait)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="pinning is only seen with two CPUs or more")
def test_a_devices_threads_run_on_its_cpus() -> None:
    """The ring thread (READs it tries) and the workers (WRITEs, refused READs) run on
    the device's CPUs; without them, anywhere the process may."""
    allowed = sorted(os.sched_getaffinity(0))
    ops = [("w", i % 60, 4) for i in range(40)] + [("r", i % 60, 4) for i in range(40)]
    for cpus, expected in (({allowed[-1]}, {allowed[-1]}), (None, set(allowed))):
        k = SimKernel(cmdr_size=64 << 10, data_size=1 << 20)
        lu = WhereLU(64, jitter=0.001)
        try:
            run_mix(k, lu, ops, 64, cpus=cpus)
        finally:
            k.close()
        assert lu.where == {("ring", frozenset(expected)), ("sim", frozenset(expected))}
    assert os.sched_getaffinity(0) == set(allowed)


def test_unusable_command_gets_a_hardware_error_and_the_ring_goes_on() -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    lu = DiskLU(8)
    dev, _m = _serve(k, lu)
    try:
        k.queue(rw10(0x2A, 0, 1), data_out=b"\x11" * 512)
        k.wait(5)
        k.reap()
        k.queue(rw10(0x2A, 0, 1), data_out=b"\x22" * 512,  # its iovec points at the mailbox
                tamper=lambda mem, entry: struct.pack_into("<QQ", mem, entry + r.IOV_OFFSET,
                                                           0, 512))
        k.queue(rw10(0x28, 0, 1), data_in_len=512)
        got: list[Completion] = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            k.wait(0.1)
            got += k.reap()
        statuses = sorted(c.status for c in got)
        assert statuses == [0, 2]
        bad = next(c for c in got if c.status == 2)
        assert bad.sense[2] == 0x04 and bad.sense[12] == 0x44
        assert lu.disk[:512] == b"\x11" * 512  # the unusable write wrote nothing
        assert struct.unpack_from("<H", k.mem, 0)[0] == 2  # the mailbox is intact
    finally:
        dev.stop()
        k.close()


def test_fuzzed_cdbs_never_break_the_ring() -> None:
    rnd = random.Random(7)
    k = SimKernel(cmdr_size=8192, data_size=256 << 10)
    lu = DiskLU(8)
    dev, _m = _serve(k, lu)
    try:
        completed = 0
        for _ in range(500):
            cdb = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([6, 10, 12, 16])))
            try:
                k.queue(cdb, data_out=bytes(rnd.randrange(0, 3) * 512),
                        data_in_len=rnd.randrange(0, 3) * 512)
            except RingFull:
                k.wait(0.5)
                completed += len(k.reap())
        deadline = time.monotonic() + 10
        while k.inflight and time.monotonic() < deadline:
            k.wait(0.1)
            completed += len(k.reap())
        assert not k.inflight and completed >= 450
    finally:
        dev.stop()
        k.close()


def test_ordering_spans() -> None:
    assert access(rw10(0x28, 10, 4)) .__dict__ == {"start": 10, "end": 14, "writes": False}
    assert access(bytes([0x12, 0, 0, 0, 36, 0])) is None  # INQUIRY touches no media
    assert access(bytes([0x42] + [0] * 9)).writes  # UNMAP: a barrier
    w = access(rw10(0x2A, 12, 4))
    assert w is not None and w.conflicts(access(rw10(0x28, 10, 4)))  # type: ignore[arg-type]
    assert not access(rw10(0x28, 0, 4)).conflicts(access(rw10(0x28, 2, 4)))  # type: ignore


def test_head_and_tail_are_never_torn_under_a_concurrent_kernel() -> None:
    """The kernel (here another process) and the handler update cmd_head and cmd_tail
    while the other reads them: both must be single 4-byte accesses.  With struct's
    byte-by-byte "<I" stores this broke the ring within seconds."""
    import os
    k = SimKernel(cmdr_size=64 << 10, data_size=16 << 20, canaries=False)
    dev, _m = _serve(k, DiskLU(2048), workers=2)
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the kernel: QD32 of 4 KiB reads for 3 s
        os.close(r_fd)
        rnd, done, ok = random.Random(5), 0, True
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline or k.inflight:
            while time.monotonic() < deadline and len(k.inflight) < 32:
                try:
                    k.queue(rw10(0x28, rnd.randrange(0, 2040), 8), data_in_len=4096)
                except RingFull:
                    break
            if not k.wait(2.0):
                ok = False
                break
            for c in k.reap(collect=False):
                ok = ok and c.status == 0
                done += 1
        os.write(w_fd, f"{int(ok)} {done}".encode())
        os._exit(0)
    os.close(w_fd)
    answer = os.read(r_fd, 100).decode().split()
    os.close(r_fd)
    os.waitpid(pid, 0)
    alive = dev._thread is not None and dev._thread.is_alive()
    dev.stop()
    k.close()
    assert alive, "the ring thread died (RingError)"
    assert answer[0] == "1" and int(answer[1]) > 1000, answer
