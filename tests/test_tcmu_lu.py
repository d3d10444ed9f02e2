"""The whole handler path natively: simulated kernel -> ring -> workers -> SCSI -> eVLU.

The kernel side is :class:`SimKernel` (a real shared mapping, entries laid out
as target_core_user lays them out); everything after it is the production
code: RingDevice, LogicalUnit, Volume, and key lookups against a real
embedded KMS.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kmsenv import KmsEnv

from gateway import format as fmt
from gateway.backstore import MemoryBackstore, open_backstore
from gateway.kms.lookup import KeyLookupService
from gateway.kms.pool import ManagerPool
from gateway.scsi import Identity, Limits, LogicalUnit
from gateway.tcmu.device import RingDevice
from gateway.tcmu.doorbell import EventfdDoorbell
from gateway.tcmu.simkernel import Completion, RingFull, SimKernel
from gateway.volume import State, Volume

BS = 512


class Harness:
    """A simulated kernel serving one volume through the real handler stack."""

    def __init__(self, volume: Volume, *, cmdr_size: int = 256 << 10, data_size: int = 8 << 20,
                 seed: int | None = None, workers: int = 4) -> None:
        self.k = SimKernel(cmdr_size=cmdr_size, data_size=data_size,
                           rng=random.Random(seed) if seed is not None else None)
        self._map = mmap.mmap(self.k.memfd, self.k.size)
        self.lu = LogicalUnit(volume, Identity(serial="6001405abcdef"),
                              Limits(max_transfer_blocks=data_size // volume.block_size))
        self.dev = RingDevice(memoryview(self._map), EventfdDoorbell(self.k.to_handler,
                                                                     self.k.to_kernel),
                              self.lu, workers=workers, name="test").start()
        self.done: dict[int, Completion] = {}

    def close(self) -> None:
        self.dev.stop()
        self._map.close()  # BufferError if the device kept a view of the mapping (as detach)
        self.k.close()

    def submit(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> int:
        deadline = time.monotonic() + 30
        while True:
            try:
                return self.k.queue(cdb, data_out, data_in_len)
            except RingFull:
                assert time.monotonic() < deadline, "ring stayed full"
                self.poll(0.05)

    def poll(self, timeout: float) -> None:
        self.k.wait(timeout)
        for c in self.k.reap():
            self.done[c.cmd_id] = c

    def result(self, cmd_id: int, timeout: float = 30) -> Completion:
        deadline = time.monotonic() + timeout
        while cmd_id not in self.done:
            assert time.monotonic() < deadline, f"command {cmd_id} never completed"
            self.poll(0.05)
        return self.done.pop(cmd_id)

    def run(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Completion:
        return self.result(self.submit(cdb, data_out, data_in_len))


def read16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0)


def write16(lba: int, n: int, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, n, 0, 0)


def key_of(sense: bytes) -> tuple[int, int, int]:
    return sense[2] & 0x0F, sense[12], sense[13]


@pytest.fixture
def evlu(kms: KmsEnv, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A 32 MiB file eVLU whose KEK is in the session's KMS (made by gateway A)."""
    path = tmp_path / "lun.img"
    yield path, kms_evlu(kms, path, 32 << 20, "tcmu")


def kms_evlu(kms: KmsEnv, path: Path, size: int, label: str) -> str:
    """Gateway A formats a file eVLU of ``size`` bytes with a new KEK; returns its key id."""
    with open(path, "wb") as f:
        f.truncate(size)
    with kms.manager("gw-a") as manager:
        key_id = manager.provision(label)
        kek = manager.fetch(key_id)
    dev = open_backstore(str(path))
    fmt.create(dev, bytes(kek), fmt.Binding(key_id, "embedded"), data_offset=fmt.MIN_DATA_OFFSET)
    dev.close()
    return key_id


def served(kms: KmsEnv, path: Path, gateway: str = "gw-b", **kw: object) -> tuple[Harness,
                                                                                  KeyLookupService]:
    lookups = KeyLookupService(ManagerPool(kms.config, gateway), retry_max=0.5).start()
    vol = Volume.open(open_backstore(str(path)), key_source=lookups)
    deadline = time.monotonic() + 20
    while vol.state == State.WAITING_FOR_KEY and time.monotonic() < deadline:
        time.sleep(0.02)
    return Harness(vol, **kw), lookups  # type: ignore[arg-type]


def test_an_initiator_session_through_the_ring(kms: KmsEnv, evlu: tuple[Path, str]) -> None:
    path, _key = evlu
    h, lookups = served(kms, path, seed=3)  # shuffled data blocks: many iovecs
    try:
        inq = h.run(bytes([0x12, 0, 0, 0, 96, 0]), data_in_len=96)
        assert inq.status == 0 and inq.data_in[8:12] == b"EVLU"
        assert inq.read_len == len(inq.data_in) == inq.data_in[4] + 5  # READ_LEN, no stale bytes
        cap = h.run(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2),
                    data_in_len=32)
        last_lba, block = struct.unpack_from(">QI", cap.data_in)
        assert (last_lba + 1) * block == (32 << 20) - fmt.MIN_DATA_OFFSET
        rnd = random.Random(1)
        written: dict[int, bytes] = {}
        for lba, n in [(0, 1), (7, 3), (100, 64), (1000, 256), (1500, 17), (40000, 2048)]:
            data = rnd.randbytes(n * BS)
            assert h.run(write16(lba, n, fua=n == 3), data).status == 0
            written[lba] = data
        for lba, data in written.items():
            got = h.run(read16(lba, len(data) // BS), data_in_len=len(data))
            assert got.status == 0 and got.data_in == data
        raw = path.read_bytes()
        for data in written.values():
            assert data[:256] not in raw  # only ciphertext on the disk
    finally:
        h.close()
        lookups.stop()


def test_not_ready_while_waiting_then_ready_with_a_unit_attention(
        own_kms: KmsEnv, tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    kms_evlu(own_kms, path, 8 << 20, "wait")
    own_kms.stop()
    lookups = KeyLookupService(ManagerPool(own_kms.config, "gw-b"), retry_max=0.5).start()
    h = Harness(Volume.open(open_backstore(str(path)), key_source=lookups))
    try:
        tur = h.run(bytes(6))
        assert tur.status == 2 and key_of(tur.sense) == (0x2, 0x04, 0x01)
        w = h.run(write16(0, 1), b"\x77" * BS)
        assert w.status == 2 and key_of(w.sense) == (0x2, 0x04, 0x01)
        own_kms.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            tur = h.run(bytes(6))
            if tur.status == 0 or key_of(tur.sense)[0] == 0x6:
                break
            time.sleep(0.1)
        assert key_of(tur.sense) == (0x6, 0x28, 0x00)  # NOT READY TO READY CHANGE, once
        assert h.run(bytes(6)).status == 0
        assert h.run(write16(0, 1), b"\x77" * BS).status == 0
        assert h.run(read16(0, 1), data_in_len=BS).data_in == b"\x77" * BS
    finally:
        h.close()
        lookups.stop()


def test_refused_key_answers_data_protect_and_writes_nothing(kms: KmsEnv,
                                                             evlu: tuple[Path, str]) -> None:
    path, key_id = evlu
    before = path.read_bytes()
    kms.manager("gw-a").deactivate(key_id)
    h, lookups = served(kms, path)
    try:
        for cdb, out, n in [(write16(0, 8), b"\x99" * 4096, 0), (read16(0, 8), b"", 4096),
                            (bytes(6), b"", 0)]:
            c = h.run(cdb, out, n)
            assert c.status == 2 and key_of(c.sense) == (0x7, 0x74, 0x71)
            assert not c.data_in.strip(b"\0")
    finally:
        h.close()
        lookups.stop()
    assert path.read_bytes() == before


def _encrypted_memory_volume(blocks: int, block_size: int = 512) -> Volume:
    dev = MemoryBackstore(fmt.MIN_DATA_OFFSET + blocks * block_size)
    kek = os.urandom(32)
    vol = Volume.open(dev, allow_plain=True)
    vol.encrypt_on(kek, fmt.Binding("k", "p"), sector_size=block_size,
                   data_offset=fmt.MIN_DATA_OFFSET, wipe=False)
    return vol


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cmdr_kib=st.sampled_from([2, 8, 64]),
       shuffle=st.booleans(), block_size=st.sampled_from([512, 4096]),
       workers=st.sampled_from([0, 4]))
def test_random_command_mixes_match_a_model(seed: int, cmdr_kib: int, shuffle: bool,
                                            block_size: int, workers: int) -> None:
    """Writes, reads, WRITE SAME, UNMAP, COMPARE AND WRITE and SYNCHRONIZE CACHE, queued
    concurrently over small rings (run by workers, or by the ring thread itself): every
    read sees exactly the writes queued before it."""
    rnd = random.Random(seed)
    blocks = 128
    vol = _encrypted_memory_volume(blocks, block_size)
    h = Harness(vol, cmdr_size=cmdr_kib * 1024, data_size=1 << 20,
                seed=seed if shuffle else None, workers=workers)
    model = bytearray(blocks * block_size)
    expect: dict[int, tuple[int, bytes]] = {}
    try:
        for _ in range(80):
            n = rnd.choice([1, 1, 2, 5, 16])
            lba = rnd.randrange(0, blocks - n + 1)
            span = slice(lba * block_size, (lba + n) * block_size)
            op = rnd.choice(["w", "w", "r", "r", "same", "unmap", "caw", "sync"])
            if op == "w":
                data = rnd.randbytes(n * block_size)
                cid = h.submit(write16(lba, n), data)
                model[span] = data
                expect[cid] = (0, b"")
            elif op == "r":
                cid = h.submit(read16(lba, n), data_in_len=n * block_size)
                expect[cid] = (0, bytes(model[span]))
            elif op == "same":
                one = rnd.randbytes(block_size)
                cid = h.submit(struct.pack(">BBQIBB", 0x93, 0, lba, n, 0, 0), one)
                model[span] = one * n
                expect[cid] = (0, b"")
            elif op == "unmap":
                param = struct.pack(">HH4xQI4x", 22, 16, lba, n)
                cid = h.submit(bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">HB", 24, 0),
                               param)
                model[span] = bytes(n * block_size)
                expect[cid] = (0, b"")
            elif op == "caw":
                old = bytes(model[lba * block_size:(lba + 1) * block_size])
                new = rnd.randbytes(block_size)
                cdb = struct.pack(">BBQ3xBBB", 0x89, 0, lba, 1, 0, 0)
                cid = h.submit(cdb, old + new)
                model[lba * block_size:(lba + 1) * block_size] = new
                expect[cid] = (0, b"")
            else:
                cid = h.submit(bytes([0x35]) + bytes(9))
                expect[cid] = (0, b"")
        for cid, (status, data) in expect.items():
            c = h.result(cid)
            assert (c.status, c.data_in) == (status, data), (cid, c)
        assert bytes(vol.read(0, blocks)) == model
        assert h.k.last_cleaned == h.k.head  # everything reaped, ring consistent
    finally:
        h.close()


@pytest.mark.parametrize("workers", [0, 4])
@pytest.mark.parametrize("block_size", [512, 4096])
def test_reads_land_decrypted_in_scattered_and_short_buffers(workers: int,
                                                             block_size: int) -> None:
    """Data placement of the READ/WRITE path: reads into one iovec or many (shuffled data
    blocks), into buffers shorter than the transfer, and writes from many iovecs, all
    equal the plaintext; the backing store holds ciphertext only."""
    blocks = 256
    vol = _encrypted_memory_volume(blocks, block_size)
    h = Harness(vol, data_size=4 << 20, seed=7, workers=workers)
    try:
        data = os.urandom(blocks * block_size)
        for lba in range(0, blocks, 64):  # 64 blocks: several shuffled 4 KiB data blocks
            chunk = data[lba * block_size:(lba + 64) * block_size]
            assert h.run(write16(lba, 64), chunk).status == 0
        ciphertext = bytes(vol.backstore.pread(blocks * block_size, vol.data_offset))
        assert ciphertext != data and data[:4096] not in ciphertext
        for lba, n in [(0, 1), (3, 8), (17, 64), (100, 156), (255, 1)]:
            c = h.run(read16(lba, n), data_in_len=n * block_size)
            assert (c.status, c.read_len) == (0, n * block_size)
            assert c.data_in == data[lba * block_size:(lba + n) * block_size]
        for lba, n, room in [(5, 16, 3 * block_size - 512 * (block_size > 512)),
                             (40, 100, 4096 + 512)]:
            c = h.run(read16(lba, n), data_in_len=room)  # the buffer holds less than asked
            assert (c.status, c.read_len) == (0, room)
            assert c.data_in == data[lba * block_size:lba * block_size + room]
    finally:
        h.close()


@pytest.mark.parametrize("workers", [0, 4])
def test_key_withdrawn_between_commands_stops_reads_at_once(workers: int) -> None:
    """A state change between commands on the same ring: the next read is refused, no
    data reaches the buffer, and nothing is written."""
    vol = _encrypted_memory_volume(64)
    h = Harness(vol, data_size=1 << 20, seed=3, workers=workers)
    try:
        data = os.urandom(16 * BS)
        assert h.run(write16(0, 16), data).status == 0
        assert h.run(read16(0, 16), data_in_len=16 * BS).data_in == data
        vol.withdraw_key("k", "revoked for the test")
        c = h.run(read16(0, 16), data_in_len=16 * BS)
        assert c.status == 2 and key_of(c.sense) == (0x7, 0x74, 0x71) and not c.data_in
        assert h.run(write16(0, 1), bytes(BS)).status == 2
        assert bytes(vol.backstore.pread(16 * BS, vol.data_offset)) != bytes(16 * BS)
    finally:
        h.close()


def test_fuzzed_cdbs_through_the_ring_never_break_anything() -> None:
    rnd = random.Random(11)
    vol = _encrypted_memory_volume(64)
    header_before = bytes(vol.backstore.pread(fmt.MIN_DATA_OFFSET, 0))
    h = Harness(vol, cmdr_size=16 << 10, data_size=1 << 20)
    try:
        ids = []
        for i in range(800):
            if i % 2:
                cdb = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([6, 10, 12, 16, 32])))
            else:  # a valid-looking command with mutated bytes
                cdb = bytearray(rnd.choice([read16(1, 2), write16(3, 1), bytes(6),
                                            bytes([0x12, 1, 0x83, 0, 255, 0])]))
                cdb[rnd.randrange(len(cdb))] ^= 1 << rnd.randrange(8)
                cdb = bytes(cdb)
            ids.append(h.submit(cdb, rnd.randbytes(rnd.choice([0, 512, 4096])),
                                rnd.choice([0, 512, 8192])))
        for cid in ids:
            c = h.result(cid)
            assert c.status in (0, 2, 4, 8)
            if c.status == 2:
                assert c.sense[0] in (0x70, 0xF0) and c.sense[2] & 0x0F != 0x4  # no internal error
        assert bytes(vol.backstore.pread(fmt.MIN_DATA_OFFSET, 0)) == header_before
        assert h.run(bytes(6)).status in (0, 2)  # still serving
    finally:
        h.close()
