"""gateway.scsi: every command over real volumes (plain and encrypted), byte for byte."""

from __future__ import annotations

import struct
import sys
import threading

import pytest
from keysources import SyncSource
from pagecache import refused_once_evicted

from gateway import format as fmt
from gateway.backstore import BackstoreIOError, MemoryBackstore, WouldBlock, open_backstore
from gateway.scsi import REGISTRY, BytesTransfer, Identity, Limits, LogicalUnit, Result
from gateway.scsi.device import naa_from_serial
from gateway.volume import State, Volume

PLAIN_BLOCKS = 256


class SpyStore(MemoryBackstore):
    """Counts flushes and can fail reads or writes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushes = 0
        self.fail_reads = self.fail_writes = False

    def _flush(self) -> None:
        self.flushes += 1

    def _preadinto(self, view: memoryview, offset: int) -> None:
        if self.fail_reads:
            raise BackstoreIOError("injected read error")
        super()._preadinto(view, offset)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        if self.fail_writes:
            raise BackstoreIOError("injected write error")
        super()._pwrite(view, offset)


def sense(key: int, asc: int, ascq: int = 0, info: int | None = None,
          field: tuple[int, int | None] | None = None, cd: bool = True) -> bytes:
    """Expected fixed-format sense, spelled out independently of gateway.scsi."""
    data = bytearray(18)
    data[0] = 0xF0 if info is not None else 0x70
    data[2] = key
    if info is not None:
        data[3:7] = info.to_bytes(4, "big")
    data[7] = 10
    data[12], data[13] = asc, ascq
    if field is not None:
        data[15] = 0x80 | (0x40 if cd else 0) | (0 if field[1] is None else 0x08 | field[1])
        data[16:18] = field[0].to_bytes(2, "big")
    return bytes(data)


ILLEGAL, INVALID_FIELD = 0x5, 0x24


def check(result: Result, key: int, asc: int, ascq: int = 0, **kw: object) -> None:
    assert result.status == 0x02, result
    assert result.sense == sense(key, asc, ascq, **kw)  # type: ignore[arg-type]


def run(lu: LogicalUnit, cdb: bytes, data_out: bytes = b"", length: int | None = None,
        contiguous: bool = True) -> tuple[Result, BytesTransfer]:
    """Run a CDB; the buffer holds ``data_out``, or ``length`` (default 4 KiB) bytes."""
    if length is None:
        length = 0 if data_out else 4096
    xfer = BytesTransfer(data_out, length, contiguous=contiguous)
    return lu.execute(bytes(cdb), xfer), xfer


def good(lu: LogicalUnit, cdb: bytes, data_out: bytes = b"", length: int | None = None) -> bytes:
    result, xfer = run(lu, cdb, data_out, length)
    assert result.status == 0 and result.sense == b"", result
    return xfer.received[: result.data_in_len]


def cdb6(op: int, lba: int = 0, n: int = 0) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n, 0))


def cdb10(op: int, lba: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def cdb12(op: int, lba: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def cdb16(op: int, lba: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def cw(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, n, 0, 0)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def rc16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def rsoc(options: int = 0, opcode: int = 0, sa: int = 0, alloc: int = 4096, rctd: bool = False) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, options | (0x80 if rctd else 0), opcode, sa, alloc, 0, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def pattern(n: int, seed: int = 1, block: int = 512) -> bytes:
    return bytes((i * seed + i // block) & 0xFF for i in range(n * block))


@pytest.fixture
def store() -> SpyStore:
    return SpyStore(PLAIN_BLOCKS * 512)


@pytest.fixture
def plain(store: SpyStore) -> Volume:
    return Volume.open(store, allow_plain=True)


@pytest.fixture
def lu(plain: Volume) -> LogicalUnit:
    return LogicalUnit(plain, Identity(serial="0123456789abcdef0123456789"), Limits())


@pytest.fixture
def evol(small_evlu, kek) -> Volume:
    vol = Volume.open(small_evlu[0], key_source=SyncSource({"k1": kek}, refuse_unknown=False))
    assert vol.state == State.ENCRYPTED
    return vol


@pytest.fixture
def elu(evol: Volume) -> LogicalUnit:
    return LogicalUnit(evol, Identity(serial="e1"), Limits())


# -- INQUIRY -----------------------------------------------------------------------

def test_standard_inquiry_layout(lu):
    data = good(lu, inquiry())
    expected = bytearray(74)
    expected[0:8] = bytes((0, 0, 0x06, 0x02, 69, 0, 0, 0x02))
    expected[8:36] = b"EVLU    eVLU            0001"
    expected[58:64] = bytes.fromhex("00a0046004c0")
    assert data == bytes(expected)


def test_inquiry_truncated_to_allocation_length_and_buffer(lu):
    result, xfer = run(lu, inquiry(alloc=5), length=64)
    assert result.data_in_len == 5 and xfer.buffer == bytes((0, 0, 6, 2, 69)) + bytes(59)
    result, xfer = run(lu, inquiry(alloc=200), length=10)
    assert result.data_in_len == 10 and xfer.buffer == bytes((0, 0, 6, 2, 69, 0, 0, 2)) + b"EV"
    assert run(lu, inquiry(alloc=0), length=64)[0] == Result(0, b"", 0)


def test_inquiry_identity_fields():
    vol = Volume.open(MemoryBackstore(1 << 16), allow_plain=True)
    lu = LogicalUnit(vol, Identity(vendor="LIO-ORG", product="evlu-disk", revision="4.0"))
    assert good(lu, inquiry())[8:36] == b"LIO-ORG evlu-disk       4.0 "
    with pytest.raises(ValueError):
        Identity(vendor="way too long")
    with pytest.raises(ValueError):
        Identity(product="caf\u00e9")


def test_inquiry_invalid_fields(lu):
    check(run(lu, inquiry(evpd=2))[0], ILLEGAL, INVALID_FIELD, field=(1, 1))  # CmdDt
    check(run(lu, inquiry(evpd=0, page=0x80))[0], ILLEGAL, INVALID_FIELD, field=(2, None))
    check(run(lu, inquiry(evpd=1, page=0x81))[0], ILLEGAL, INVALID_FIELD, field=(2, None))
    check(run(lu, inquiry()[:5] + b"\x04")[0], ILLEGAL, INVALID_FIELD, field=(5, 2))  # NACA


def test_vpd_supported_pages_and_serial(lu):
    assert good(lu, inquiry(1, 0x00)) == bytes.fromhex("00000006 00 80 83 b0 b1 b2".replace(" ", ""))
    assert good(lu, inquiry(1, 0x80)) == b"\x00\x80\x00\x1a0123456789abcdef0123456789"


def test_naa_derivation_matches_lio():
    # LIO: 6 | OUI 001405 | the serial's hex digits (others skipped), 25 nibbles
    assert naa_from_serial("0123456789abcdef0123456789") == 0x60014050123456789ABCDEF012345678
    assert naa_from_serial("d2b4-x-9") == 0x6001405D2B49 << 80
    assert Identity(serial="").naa is None
    assert Identity(serial="ab", naa=7).naa == 7


def test_vpd_device_identification(lu):
    data = good(lu, inquiry(1, 0x83))
    naa = bytes.fromhex("01030010 60014050123456789abcdef012345678")
    t10 = bytes((2, 1, 0, 34)) + b"EVLU    0123456789abcdef0123456789"
    assert data == b"\x00\x83" + (len(naa) + len(t10)).to_bytes(2, "big") + naa + t10


def test_vpd_device_identification_without_serial_and_with_device_id(plain):
    lu = LogicalUnit(plain, Identity(device_id=b"\x01\x02"))
    t10 = bytes((2, 1, 0, 12)) + b"EVLU    eVLU"
    vendor = bytes((1, 0, 0, 2, 1, 2))
    assert good(lu, inquiry(1, 0x83)) == b"\x00\x83\x00\x16" + t10 + vendor


def test_vpd_block_limits(plain):
    limits = Limits(max_transfer_blocks=2048, optimal_transfer_blocks=128, max_unmap_blocks=8192,
                    max_unmap_descriptors=16, max_write_same_blocks=4096, max_compare_write_blocks=1)
    data = good(LogicalUnit(plain, limits=limits), inquiry(1, 0xB0))
    expected = bytearray(64)
    expected[0:8] = bytes((0, 0xB0, 0, 0x3C, 0x01, 1, 0, 0))
    struct.pack_into(">IIIIIII", expected, 8, 2048, 128, 0, 8192, 16, 8, 0)
    struct.pack_into(">Q", expected, 36, 4096)
    assert data == bytes(expected)
    data = good(LogicalUnit(plain, limits=Limits(unmap_supported=False)), inquiry(1, 0xB0))
    assert data[20:32] == bytes(12)


def test_vpd_block_device_characteristics(lu):
    assert good(lu, inquiry(1, 0xB1)) == b"\x00\xb1\x00\x3c\x00\x01" + bytes(58)


def test_vpd_provisioning_lbprz_only_when_true(plain, elu):
    assert good(elu, inquiry(1, 0xB2)) == bytes((0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0))
    assert good(LogicalUnit(plain), inquiry(1, 0xB2)) == bytes((0, 0xB2, 0, 4, 0, 0xE0, 0x02, 0))
    lu = LogicalUnit(plain, limits=Limits(plain_unmap_reads_zeroes=True))
    assert good(lu, inquiry(1, 0xB2))[5] == 0xE4
    lu = LogicalUnit(plain, limits=Limits(unmap_supported=False))
    assert good(lu, inquiry(1, 0xB2)) == bytes((0, 0xB2, 0, 4, 0, 0, 0, 0))


# -- capacity ----------------------------------------------------------------------

def test_read_capacity_plain(lu):
    assert good(lu, cdb10(0x25)) == struct.pack(">II", PLAIN_BLOCKS - 1, 512)
    assert good(lu, rc16()) == struct.pack(">QIBBH16x", PLAIN_BLOCKS - 1, 512, 0, 0, 0x8000)
    assert good(lu, rc16(alloc=12)) == struct.pack(">QI", PLAIN_BLOCKS - 1, 512)


def test_read_capacity_encrypted_is_the_data_segment(elu, evol, small_evlu):
    dev = small_evlu[0]
    blocks = (dev.size - fmt.MIN_DATA_OFFSET) // 512
    assert evol.num_blocks == blocks
    assert good(elu, cdb10(0x25)) == struct.pack(">II", blocks - 1, 512)
    assert good(elu, rc16()) == struct.pack(">QIBBH16x", blocks - 1, 512, 0, 0, 0xC000)


def test_read_capacity10_saturates():
    class Huge:
        state, block_size, num_blocks, header = State.UNENCRYPTED, 4096, 1 << 33, None

        def add_listener(self, listener):
            pass

    lu = LogicalUnit(Huge())  # type: ignore[arg-type]
    assert good(lu, cdb10(0x25)) == struct.pack(">II", 0xFFFFFFFF, 4096)
    assert good(lu, rc16())[:12] == struct.pack(">QI", (1 << 33) - 1, 4096)


def test_read_capacity16_without_unmap(plain):
    lu = LogicalUnit(plain, limits=Limits(unmap_supported=False))
    assert good(lu, rc16())[14] == 0


# -- MODE SENSE -------------------------------------------------------------------

CACHING_WCE = bytes((0x08, 0x12, 0x04)) + bytes(17)
CONTROL_PAGE = bytes((0x0A, 0x0A, 0x02, 0x10)) + bytes(8)


def ms6(page: int, dbd: bool = False, alloc: int = 255, pc: int = 0, sub: int = 0) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0))


def ms10(page: int, dbd: bool = False, llbaa: bool = False, alloc: int = 1024, pc: int = 0) -> bytes:
    return struct.pack(">BBBB3xHB", 0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0),
                       (pc << 6) | page, 0, alloc, 0)


def test_mode_sense6_caching_with_block_descriptor(lu):
    descriptor = struct.pack(">IxBH", PLAIN_BLOCKS, 0, 512)
    assert good(lu, ms6(0x08)) == bytes((3 + 8 + 20, 0, 0x10, 8)) + descriptor + CACHING_WCE


def test_mode_sense6_all_pages_dbd_and_truncation(lu):
    assert good(lu, ms6(0x3F, dbd=True)) == bytes((35, 0, 0x10, 0)) + CACHING_WCE + CONTROL_PAGE
    assert good(lu, ms6(0x3F, dbd=True, sub=0xFF)) == bytes((35, 0, 0x10, 0)) + CACHING_WCE + CONTROL_PAGE
    assert good(lu, ms6(0x3F, dbd=True, alloc=6)) == bytes((35, 0, 0x10, 0)) + CACHING_WCE[:2]


def test_mode_sense10_long_lba_and_control(lu):
    data = good(lu, ms10(0x0A, llbaa=True))
    descriptor = struct.pack(">Q4xI", PLAIN_BLOCKS, 512)
    assert data == struct.pack(">HBBBxH", 6 + 16 + 12, 0, 0x10, 1, 16) + descriptor + CONTROL_PAGE
    data = good(lu, ms10(0x08, dbd=True))
    assert data == struct.pack(">HBBBxH", 6 + 20, 0, 0x10, 0, 0) + CACHING_WCE


def test_mode_sense_write_cache_off_changeable_and_errors(plain, lu):
    off = LogicalUnit(plain, limits=Limits(write_cache=False))
    assert good(off, ms6(0x08, dbd=True))[4:7] == bytes((0x08, 0x12, 0x00))
    changeable = good(lu, ms6(0x3F, dbd=True, pc=1))[4:]
    assert changeable == bytes((0x08, 0x12)) + bytes(18) + bytes((0x0A, 0x0A)) + bytes(10)
    check(run(lu, ms6(0x08, pc=3))[0], ILLEGAL, 0x39, 0, field=(2, 7))
    check(run(lu, ms6(0x1C))[0], ILLEGAL, INVALID_FIELD, field=(2, 5))
    check(run(lu, ms6(0x08, sub=1))[0], ILLEGAL, INVALID_FIELD, field=(3, None))


def test_mode_select_is_not_supported(lu):
    check(run(lu, bytes((0x15, 0x10, 0, 0, 24, 0)), bytes(24))[0], ILLEGAL, 0x20)
    check(run(lu, bytes((0x55, 0x10, 0, 0, 0, 0, 0, 0, 28, 0)), bytes(28))[0], ILLEGAL, 0x20)


# -- READ / WRITE -------------------------------------------------------------------

@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_write_then_read_every_size(lu, store, size):
    build = {6: cdb6, 10: cdb10, 12: cdb12, 16: cdb16}[size]
    wop, rop = {6: (0x0A, 0x08), 10: (0x2A, 0x28), 12: (0xAA, 0xA8), 16: (0x8A, 0x88)}[size]
    data = pattern(3, seed=size)
    assert good(lu, build(wop, 5, 3), data) == b""
    assert store.data[5 * 512 : 8 * 512] == data  # plain: passes through
    assert good(lu, build(rop, 5, 3), length=3 * 512) == data


def test_read6_zero_length_means_256_blocks(lu):
    result, xfer = run(lu, cdb6(0x08, 0, 0), length=256 * 512)
    assert result == Result(0, b"", 256 * 512)
    check(run(lu, cdb6(0x08, 1, 0), length=256 * 512)[0], ILLEGAL, 0x21)


def test_zero_length_transfers_are_good_and_touch_nothing(lu, store):
    before = store.data
    assert run(lu, cdb10(0x28, 10, 0), length=512)[0] == Result(0)
    assert run(lu, cdb16(0x8A, 10, 0), b"x" * 512)[0] == Result(0)
    assert run(lu, cdb10(0x28, PLAIN_BLOCKS, 0))[0] == Result(0)
    check(run(lu, cdb10(0x28, PLAIN_BLOCKS + 1, 0))[0], ILLEGAL, 0x21)
    assert store.data == before


def test_lba_out_of_range(lu, store):
    before = store.data
    check(run(lu, cdb10(0x2A, PLAIN_BLOCKS - 1, 2), bytes(1024))[0], ILLEGAL, 0x21)
    check(run(lu, cdb16(0x88, (1 << 64) - 1, 1), length=512)[0], ILLEGAL, 0x21)
    check(run(lu, cdb16(0x8A, (1 << 64) - 1, 2), bytes(1024))[0], ILLEGAL, 0x21)
    assert store.data == before


@pytest.mark.parametrize("op", [0x28, 0xA8, 0x88, 0x2A, 0xAA, 0x8A, 0x2F, 0x8F])
def test_rdprotect_wrprotect_vrprotect_refused(lu, store, op):
    build = cdb10 if op < 0x80 else cdb16 if op < 0xA0 else cdb12
    result, _ = run(lu, build(op, 0, 1, flags=0x20), bytes(512))
    check(result, ILLEGAL, INVALID_FIELD, field=(1, 7))
    assert store.data == bytes(len(store.data))


def test_dpo_ignored_fua_reaches_the_backend(lu, store):
    good(lu, cdb10(0x2A, 0, 1, flags=0x10), bytes(512))  # DPO
    assert store.flushes == 0
    good(lu, cdb10(0x2A, 0, 1, flags=0x08), bytes(512))  # FUA
    assert store.flushes == 1
    good(lu, cdb16(0x8A, 0, 1, flags=0x08), bytes(512))
    assert store.flushes == 2


def test_write_cache_off_makes_every_write_durable(plain, store):
    """WCE=0 (LIO's emulate_write_cache=0) is write-through: each write is flushed, WRITE
    SAME and COMPARE AND WRITE included, as no SYNCHRONIZE CACHE will follow."""
    lu = LogicalUnit(plain, limits=Limits(write_cache=False))
    good(lu, cdb10(0x2A, 0, 1), bytes(512))
    assert store.flushes == 1
    good(lu, cdb10(0x41, 8, 4), b"\x5a" * 512)  # WRITE SAME(10)
    assert store.flushes == 2
    good(lu, cdb16(0x89, 0, 1), bytes(512) + b"\x01" * 512)  # COMPARE AND WRITE
    assert store.flushes == 3 and bytes(plain.read(0, 1)) == b"\x01" * 512


def test_read_scattered_buffer(lu):
    good(lu, cdb10(0x2A, 7, 2), pattern(2, 3))
    result, xfer = run(lu, cdb10(0x28, 7, 2), length=1024, contiguous=False)
    assert result == Result(0, b"", 1024) and xfer.received == pattern(2, 3)


def test_read_into_a_longer_buffer_reports_its_length(lu):
    good(lu, cdb10(0x2A, 7, 1), pattern(1, 5))
    result, xfer = run(lu, cdb10(0x28, 7, 1), b"\xee" * 2048)
    assert result.data_in_len == 512
    assert xfer.buffer == pattern(1, 5) + b"\xee" * 1536


@pytest.mark.parametrize("contiguous", [True, False])
def test_read_into_a_shorter_buffer_fills_only_it(lu, contiguous):
    good(lu, cdb10(0x2A, 0, 4), pattern(4, 7))
    result, xfer = run(lu, cdb10(0x28, 0, 4), length=700, contiguous=contiguous)
    assert result == Result(0, b"", 700)
    assert xfer.buffer == pattern(4, 7)[:700]


def test_write_with_a_short_buffer_writes_nothing(lu, store):
    check(run(lu, cdb10(0x2A, 0, 2), b"x" * 1000)[0], ILLEGAL, 0x0E, 0x03)
    assert store.data == bytes(len(store.data))


def test_max_transfer_length_enforced(plain):
    lu = LogicalUnit(plain, limits=Limits(max_transfer_blocks=8))
    check(run(lu, cdb10(0x28, 0, 9), length=9 * 512)[0], ILLEGAL, INVALID_FIELD, field=(7, None))
    check(run(lu, cdb16(0x8A, 0, 9), bytes(9 * 512))[0], ILLEGAL, INVALID_FIELD, field=(10, None))
    check(run(lu, cdb12(0xA8, 0, 9), length=9 * 512)[0], ILLEGAL, INVALID_FIELD, field=(6, None))
    assert good(lu, cdb10(0x28, 0, 8), length=8 * 512) == bytes(8 * 512)


def test_encrypted_write_stores_ciphertext_and_reads_back(elu, small_evlu):
    dev = small_evlu[0]
    data = pattern(4, 11)
    good(elu, cdb10(0x2A, 3, 4), data)
    stored = dev.data[fmt.MIN_DATA_OFFSET + 3 * 512 : fmt.MIN_DATA_OFFSET + 7 * 512]
    assert stored != data and stored != bytes(len(stored))
    assert good(elu, cdb16(0x88, 3, 4), length=len(data)) == data
    assert good(elu, cdb10(0x28, 100, 2), length=1024) == bytes(1024)  # never written: zeroes


def test_medium_errors(lu, store):
    store.fail_reads = True
    check(run(lu, cdb10(0x28, 0, 1), length=512)[0], 0x3, 0x11)
    check(run(lu, cdb10(0x2F, 0, 1))[0], 0x3, 0x11)
    store.fail_reads, store.fail_writes = False, True
    check(run(lu, cdb10(0x2A, 0, 1), bytes(512))[0], 0x3, 0x0C)
    check(run(lu, cdb10(0x41, 0, 4), bytes(512))[0], 0x3, 0x0C)


def test_internal_error_is_hardware_error(lu, plain, monkeypatch, caplog):
    def broken(lba, buf):
        raise ZeroDivisionError("bug")
    monkeypatch.setattr(plain, "readinto", broken)
    check(run(lu, cdb10(0x28, 0, 1), length=512)[0], 0x4, 0x44)
    assert "internal error" in caplog.text


# -- VERIFY, SYNCHRONIZE CACHE, PRE-FETCH, START STOP -------------------------------------

def test_verify(lu):
    data = pattern(3, 13)
    good(lu, cdb10(0x2A, 20, 3), data)
    good(lu, cdb10(0x2F, 20, 3))  # BYTCHK 0
    good(lu, cdb16(0x8F, 20, 3, flags=0x02), data)  # BYTCHK 1
    wrong = bytearray(data)
    wrong[1000] ^= 1
    check(run(lu, cdb10(0x2F, 20, 3, flags=0x02), bytes(wrong))[0], 0xE, 0x1D, info=1000)
    check(run(lu, cdb10(0x2F, 20, 3, flags=0x04), bytes(512))[0], ILLEGAL, INVALID_FIELD, field=(1, 2))
    check(run(lu, cdb10(0x2F, PLAIN_BLOCKS - 1, 2))[0], ILLEGAL, 0x21)
    check(run(lu, cdb10(0x2F, 20, 3, flags=0x02), data[:1000])[0], ILLEGAL, 0x0E, 0x03)


def test_verify_bytchk3_compares_one_block_with_each(lu):
    block = pattern(1, 17)
    good(lu, cdb10(0x2A, 30, 4), block * 4)
    good(lu, cdb10(0x2F, 30, 4, flags=0x06), block)
    good(lu, cdb10(0x2A, 32, 1), bytes(512))
    check(run(lu, cdb10(0x2F, 30, 4, flags=0x06), block)[0], 0xE, 0x1D,
          info=2 * 512 + next(i for i, b in enumerate(block) if b))


def test_synchronize_cache(lu, store):
    good(lu, cdb10(0x35, 0, 0))
    good(lu, cdb16(0x91, 10, PLAIN_BLOCKS - 10))
    assert store.flushes == 2
    check(run(lu, cdb10(0x35, PLAIN_BLOCKS, 1))[0], ILLEGAL, 0x21)
    assert store.flushes == 2


def test_prefetch_and_start_stop(lu):
    assert run(lu, cdb10(0x34, 0, 8))[0] == Result(0)
    assert run(lu, cdb16(0x90, PLAIN_BLOCKS - 1, 1))[0] == Result(0)
    check(run(lu, cdb16(0x90, PLAIN_BLOCKS, 1))[0], ILLEGAL, 0x21)
    assert run(lu, bytes((0x1B, 0, 0, 0, 0x01, 0)))[0] == Result(0)


# -- UNMAP and WRITE SAME -------------------------------------------------------------

def test_unmap_encrypted_reads_zeroes(elu, small_evlu):
    good(elu, cdb10(0x2A, 0, 8), pattern(8, 3))
    params = unmap_params((2, 3), (6, 1))
    good(elu, struct.pack(">BB4xBHB", 0x42, 0, 0, len(params), 0), params)
    data = good(elu, cdb10(0x28, 0, 8), length=8 * 512)
    expected = bytearray(pattern(8, 3))
    expected[2 * 512 : 5 * 512] = bytes(3 * 512)
    expected[6 * 512 : 7 * 512] = bytes(512)
    assert data == bytes(expected)
    dev = small_evlu[0]
    assert dev.data[fmt.MIN_DATA_OFFSET + 2 * 512 : fmt.MIN_DATA_OFFSET + 5 * 512] == bytes(1536)


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 1 if anchor else 0, 0, length, 0)


def test_unmap_validation(plain, store):
    lu = LogicalUnit(plain, limits=Limits(max_unmap_blocks=10, max_unmap_descriptors=2))
    good(lu, cdb10(0x2A, 0, 4), pattern(4))
    before = store.data
    assert run(lu, unmap_cdb(0))[0] == Result(0)
    check(run(lu, unmap_cdb(6), bytes(6))[0], ILLEGAL, 0x1A)
    params = unmap_params((0, 1), (1, 1), (2, 1))
    check(run(lu, unmap_cdb(len(params)), params)[0], ILLEGAL, 0x26, field=(2, None), cd=False)
    params = unmap_params((0, 6), (10, 5))
    check(run(lu, unmap_cdb(len(params)), params)[0], ILLEGAL, 0x26, field=(8, None), cd=False)
    params = unmap_params((0, 1), (PLAIN_BLOCKS - 1, 2))
    check(run(lu, unmap_cdb(len(params)), params)[0], ILLEGAL, 0x21)
    params = unmap_params((0, 1))
    check(run(lu, unmap_cdb(len(params), anchor=True), params)[0], ILLEGAL, INVALID_FIELD, field=(1, 0))
    assert store.data == before  # nothing unmapped by a refused list
    good(lu, unmap_cdb(len(params)), params)
    assert store.data[:512] == bytes(512)


def test_unmap_unsupported_is_an_invalid_opcode(plain):
    lu = LogicalUnit(plain, limits=Limits(unmap_supported=False))
    params = unmap_params((0, 1))
    check(run(lu, unmap_cdb(len(params)), params)[0], ILLEGAL, 0x20)


def ws10(lba: int, n: int, flags: int = 0) -> bytes:
    return cdb10(0x41, lba, n, flags)


def test_write_same_encrypted_writes_ciphertext(elu, small_evlu):
    block = pattern(1, 9)
    good(elu, ws10(10, 5), block)
    assert good(elu, cdb10(0x28, 9, 7), length=7 * 512) == bytes(512) + block * 5 + bytes(512)
    stored = small_evlu[0].data[fmt.MIN_DATA_OFFSET + 10 * 512 : fmt.MIN_DATA_OFFSET + 15 * 512]
    assert block not in stored and stored != bytes(len(stored))


def test_write_same_large_goes_in_chunks(elu, evol):
    blocks = 3000  # > 1 MiB
    good(elu, cdb16(0x93, 1, blocks), b"\x5a" * 512)
    assert evol.read(0, blocks + 2) == bytes(512) + b"\x5a" * (blocks * 512) + bytes(512)


def test_write_same_unmap_bit(elu, small_evlu):
    good(elu, cdb10(0x2A, 0, 4), pattern(4, 3))
    good(elu, ws10(0, 2, flags=0x08), bytes(512))  # zeroes + UNMAP: deallocated
    assert small_evlu[0].data[fmt.MIN_DATA_OFFSET : fmt.MIN_DATA_OFFSET + 1024] == bytes(1024)
    good(elu, ws10(2, 2, flags=0x08), b"\x01" * 512)  # not zeroes: written
    assert good(elu, cdb10(0x28, 0, 4), length=2048) == bytes(1024) + b"\x01" * 1024
    good(elu, cdb16(0x93, 2, 1, flags=0x09))  # NDOB + UNMAP
    assert small_evlu[0].data[fmt.MIN_DATA_OFFSET + 1024 : fmt.MIN_DATA_OFFSET + 1536] == bytes(512)
    assert good(elu, cdb10(0x28, 2, 1), length=512) == bytes(512)


def test_write_same_plain_unmap_bit_writes_zeroes_without_lbprz(lu, store):
    good(lu, cdb10(0x2A, 0, 2), pattern(2, 3))
    good(lu, ws10(0, 2, flags=0x08), bytes(512))
    assert store.data[:1024] == bytes(1024)


def test_write_same_validation(plain, store):
    lu = LogicalUnit(plain, limits=Limits(max_write_same_blocks=16))
    check(run(lu, ws10(0, 0), bytes(512))[0], ILLEGAL, INVALID_FIELD, field=(7, None))  # WSNZ
    check(run(lu, ws10(0, 17), bytes(512))[0], ILLEGAL, INVALID_FIELD, field=(7, None))
    check(run(lu, cdb16(0x93, 0, 17), bytes(512))[0], ILLEGAL, INVALID_FIELD, field=(10, None))
    check(run(lu, ws10(0, 4, flags=0x20), bytes(512))[0], ILLEGAL, INVALID_FIELD, field=(1, 7))
    check(run(lu, ws10(0, 4, flags=0x10), bytes(512))[0], ILLEGAL, INVALID_FIELD, field=(1, 4))
    check(run(lu, ws10(0, 4, flags=0x02), bytes(512))[0], ILLEGAL, INVALID_FIELD, field=(1, 1))
    check(run(lu, ws10(PLAIN_BLOCKS - 2, 4), bytes(512))[0], ILLEGAL, 0x21)
    check(run(lu, ws10(0, 4), bytes(100))[0], ILLEGAL, 0x0E, 0x03)
    assert store.data == bytes(len(store.data))


# -- COMPARE AND WRITE ----------------------------------------------------------------

def test_compare_and_write(elu):
    old, new = pattern(1, 3), pattern(1, 5)
    good(elu, cdb10(0x2A, 40, 1), old)
    good(elu, cw(40, 1, flags=0x08), old + new)
    assert good(elu, cdb10(0x28, 40, 1), length=512) == new
    wrong = bytearray(new)
    wrong[77] ^= 0xFF
    check(run(elu, cw(40, 1), bytes(wrong) + old)[0], 0xE, 0x1D, info=77)
    assert good(elu, cdb10(0x28, 40, 1), length=512) == new  # nothing written
    assert run(elu, cw(40, 0))[0] == Result(0)
    check(run(elu, cw(40, 2), bytes(2048))[0], ILLEGAL, INVALID_FIELD, field=(13, None))
    check(run(elu, cw(40, 1), bytes(1000))[0], ILLEGAL, 0x0E, 0x03)
    check(run(elu, cw(40, 1, flags=0x40), bytes(1024))[0], ILLEGAL, INVALID_FIELD, field=(1, 7))


def test_compare_and_write_increments_are_atomic(plain):
    """Threads increment a counter with read + COMPARE AND WRITE (as VMware's ATS
    does): a lost update would mean a C&W interleaved with another."""
    lu = LogicalUnit(plain)
    per_thread, done = 40, []

    def incrementer() -> None:
        n = 0
        while n < per_thread:
            current = good(lu, cdb10(0x28, 9, 1), length=512)
            value = int.from_bytes(current[:8], "big")
            result, _ = run(lu, cw(9, 1), current + (value + 1).to_bytes(8, "big") + bytes(504))
            if result.status == 0:
                n += 1
            else:
                assert result.sense[2] == 0xE
        done.append(n)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=incrementer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert done == [per_thread] * 4
    assert int.from_bytes(good(lu, cdb10(0x28, 9, 1), length=512)[:8], "big") == 4 * per_thread


@pytest.mark.parametrize("cdb,data", [
    (cdb10(0x2A, 2, 1), b"\x11" * 512),
    (cdb16(0x8A, 7, 2), b"\x11" * 1024),
    (cw(3, 1), bytes(512) + b"\x11" * 512),
    (cdb10(0x41, 0, 20), b"\x11" * 512),
    (struct.pack(">BB4xBHB", 0x42, 0, 0, 24, 0), struct.pack(">HH4xQI4x", 22, 16, 5, 1)),
])
def test_every_modification_waits_for_its_range(plain, store, cdb, data):
    lu = LogicalUnit(plain)
    if cdb[0] == 0x42:
        good(lu, cdb10(0x2A, 5, 1), b"\x22" * 512)
    before = store.data
    thread = threading.Thread(target=run, args=(lu, cdb, data))
    with lu.locks.hold(7, 1) if cdb[0] == 0x8A else lu.locks.hold(0, 6):
        thread.start()
        thread.join(0.2)
        assert thread.is_alive() and store.data == before
    thread.join(5)
    assert not thread.is_alive() and store.data != before


def test_range_lock_serializes_overlapping_and_not_disjoint():
    from gateway.scsi.locks import RangeLock
    lock = RangeLock()
    entered = threading.Event()
    order: list[str] = []
    with lock.hold(0, 10):
        def other(lba: int, name: str) -> None:
            with lock.hold(lba, 5):
                order.append(name)
                entered.set()
        t = threading.Thread(target=other, args=(5, "overlap"))
        t.start()
        d = threading.Thread(target=other, args=(10, "disjoint"))
        d.start()
        d.join(5)
        assert order == ["disjoint"]  # ran while [0, 10) was held
        assert len(lock) == 1 + 0
        order.append("release")
    t.join(5)
    assert order == ["disjoint", "release", "overlap"]
    assert len(lock) == 0


# -- REPORT SUPPORTED OPERATION CODES --------------------------------------------------

def test_report_all_opcodes_from_the_registry(lu):
    data = good(lu, rsoc())
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    descriptors = [data[i : i + 8] for i in range(4, len(data), 8)]
    listed = [(d[0], int.from_bytes(d[2:4], "big"), d[5], int.from_bytes(d[6:8], "big"))
              for d in descriptors]
    expected = [(c.opcode, c.service_action or 0, 1 if c.service_action is not None else 0,
                 c.cdb_length) for c in REGISTRY]
    assert listed == expected
    ops = {d[0] for d in listed}
    assert {0x00, 0x03, 0x12, 0x1A, 0x5A, 0x25, 0x9E, 0x28, 0x2A, 0x88, 0x8A, 0x42, 0x41, 0x93,
            0x89, 0x35, 0x91, 0x2F, 0x8F, 0xA3} <= ops
    assert 0x15 not in ops  # MODE SELECT


def test_report_opcodes_with_timeouts_and_without_unmap(plain):
    lu = LogicalUnit(plain, limits=Limits(unmap_supported=False))
    data = good(lu, rsoc(rctd=True))
    assert (len(data) - 4) % 20 == 0
    first = data[4:24]
    assert first == bytes((0, 0, 0, 0, 0, 0x02, 0, 6)) + struct.pack(">HxxII", 10, 0, 30)
    assert 0x42 not in data[4::20]


def test_report_one_opcode(lu):
    read10 = bytes((0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x04))
    assert good(lu, rsoc(1, 0x28)) == bytes((0, 3, 0, 10)) + read10
    assert good(lu, rsoc(1, 0x28, rctd=True)) == bytes((0, 0x83, 0, 10)) + read10 + \
        struct.pack(">HxxII", 10, 0, 30)
    rc16_usage = bytes((0x9E, 0x1F)) + bytes(8) + b"\xff" * 4 + bytes((0, 4))
    assert good(lu, rsoc(2, 0x9E, 0x10)) == bytes((0, 3, 0, 16)) + rc16_usage
    assert good(lu, rsoc(1, 0x15)) == bytes((0, 1, 0, 0))  # MODE SELECT: not supported
    assert good(lu, rsoc(2, 0x9E, 0x11)) == bytes((0, 1, 0, 0))
    check(run(lu, rsoc(1, 0x9E))[0], ILLEGAL, INVALID_FIELD, field=(3, None))
    check(run(lu, rsoc(2, 0x28))[0], ILLEGAL, INVALID_FIELD, field=(3, None))
    check(run(lu, rsoc(4))[0], ILLEGAL, INVALID_FIELD, field=(2, 2))
    assert good(lu, rsoc(1, 0x28, alloc=3)) == bytes((0, 3, 0))


def test_cdb_lengths_follow_the_group_codes():
    group = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}
    for cmd in REGISTRY:
        assert cmd.cdb_length == group[cmd.opcode >> 5], cmd.name
        assert cmd.usage[-1] == 0x04  # CONTROL: NACA evaluated


def test_unsupported_opcodes_and_short_cdbs(lu):
    check(run(lu, b"")[0], ILLEGAL, 0x20)
    check(run(lu, bytes((0xC0, 0, 0, 0, 0, 0)))[0], ILLEGAL, 0x20)
    check(run(lu, bytes((0x9E, 0x11)) + bytes(14))[0], ILLEGAL, 0x20)  # unknown service action
    check(run(lu, bytes((0x28, 0, 0)))[0], ILLEGAL, INVALID_FIELD)


# -- states and unit attentions ---------------------------------------------------------

class NoAnswer:
    def request(self, volume: Volume, bindings: list[fmt.EvluToken]) -> None:
        pass


MEDIA_COMMANDS = [
    (cdb6(0x00), b""),
    (cdb10(0x28, 0, 1), b""),
    (cdb6(0x0A, 0, 1), bytes(512)),
    (cdb10(0x2A, 0, 1), b"x" * 512),
    (cdb16(0x8A, 0, 1), b"x" * 512),
    (cdb10(0x2F, 0, 1), b""),
    (cw(0, 1), bytes(1024)),
    (cdb10(0x35), b""),
    (cdb16(0x90, 0, 1), b""),
    (ws10(0, 1), b"x" * 512),
    (unmap_cdb(24), unmap_params((0, 1))),
]


@pytest.mark.parametrize("cdb,data", MEDIA_COMMANDS)
def test_waiting_for_key_is_not_ready_and_writes_nothing(small_evlu, cdb, data):
    dev = small_evlu[0]
    vol = Volume.open(dev, key_source=NoAnswer())
    assert vol.state == State.WAITING_FOR_KEY
    lu = LogicalUnit(vol)
    before = dev.data
    check(run(lu, cdb, data, length=512)[0], 0x2, 0x04, 0x01)
    vol.refuse_key("k1", "x")
    assert vol.state == State.NO_KEY
    check(run(lu, cdb, data, length=512)[0], 0x7, 0x74, 0x71)
    assert dev.data == before


def test_commands_that_work_in_any_state(small_evlu):
    vol = Volume.open(small_evlu[0], key_source=NoAnswer())
    lu = LogicalUnit(vol)
    good(lu, inquiry())
    good(lu, inquiry(1, 0xB2))
    good(lu, ms6(0x3F))
    good(lu, rsoc())
    good(lu, bytes((0x1B, 0, 0, 0, 1, 0)))
    check(run(lu, cdb10(0x25))[0], 0x2, 0x04, 0x01)  # READ CAPACITY: NOT READY
    assert good(lu, bytes((0x03, 0, 0, 0, 18, 0))) == sense(0x2, 0x04, 0x01)
    vol.refuse_key("k1", "x")
    assert good(lu, rc16())[:8] == (vol.num_blocks - 1).to_bytes(8, "big")  # known, but locked
    assert good(lu, bytes((0x03, 0, 0, 0, 18, 0))) == sense(0x7, 0x74, 0x71)


def test_unknown_state_is_not_ready_0403(plain):
    plain.close()
    lu = LogicalUnit(plain)
    check(run(lu, cdb6(0x00))[0], 0x2, 0x04, 0x03)


def test_request_sense(lu):
    assert good(lu, bytes((0x03, 0, 0, 0, 252, 0))) == sense(0x0, 0, 0)
    assert good(lu, bytes((0x03, 0, 0, 0, 8, 0))) == sense(0x0, 0, 0)[:8]
    check(run(lu, bytes((0x03, 1, 0, 0, 252, 0)))[0], ILLEGAL, INVALID_FIELD, field=(1, 0))


def test_unit_attention_reported_once_except_to_inquiry_and_request_sense(lu):
    lu.post_unit_attention(0x2A, 0x09)
    lu.post_unit_attention(0x2A, 0x09)  # not queued twice
    good(lu, inquiry())
    check(run(lu, cdb10(0x28, 0, 1), length=512)[0], 0x6, 0x2A, 0x09)
    good(lu, cdb10(0x28, 0, 1), length=512)
    lu.post_unit_attention(0x3F, 0x03)
    lu.post_unit_attention(0x28, 0x00)
    assert good(lu, bytes((0x03, 0, 0, 0, 18, 0))) == sense(0x6, 0x3F, 0x03)
    check(run(lu, bytes((0xC0,)) + bytes(5))[0], 0x6, 0x28, 0x00)  # even before "unsupported"
    good(lu, cdb6(0x00))


def test_capacity_change_posts_unit_attention(tmp_path):
    from gateway.backstore import FileBackstore
    path = tmp_path / "lun"
    path.write_bytes(bytes(64 * 512))
    vol = Volume.open(FileBackstore(str(path)), allow_plain=True)
    lu = LogicalUnit(vol)
    good(lu, cdb6(0x00))
    with open(path, "ab") as f:
        f.write(bytes(64 * 512))
    assert vol.rescan().capacity_changed
    check(run(lu, cdb10(0x25))[0], 0x6, 0x2A, 0x09)
    assert good(lu, cdb10(0x25)) == struct.pack(">II", 127, 512)
    vol.close()


def test_key_arrival_and_key_change_post_unit_attentions(small_evlu, kek):
    dev = small_evlu[0]
    vol = Volume.open(dev, key_source=NoAnswer())
    lu = LogicalUnit(vol)
    check(run(lu, cdb6(0x00))[0], 0x2, 0x04, 0x01)
    vol.offer_kek("k1", kek)
    check(run(lu, cdb6(0x00))[0], 0x6, 0x28, 0x00)  # medium may have changed
    good(lu, cdb6(0x00))


def test_plain_to_encrypted_posts_inquiry_data_changed(kek):
    dev = MemoryBackstore(4 << 20)
    vol = Volume.open(dev, allow_plain=True, key_source=SyncSource({"k1": kek}, refuse_unknown=False))
    lu = LogicalUnit(vol)
    assert good(lu, inquiry(1, 0xB2))[5] == 0xE0
    fmt.create(dev, kek, fmt.Binding("k1", "default"), data_offset=fmt.MIN_DATA_OFFSET)
    vol.rescan()
    assert vol.state == State.ENCRYPTED
    seen = []
    for _ in range(4):
        result, _ = run(lu, cdb6(0x00))
        if result.status == 0:
            break
        assert result.sense[2] == 0x6
        seen.append((result.sense[12], result.sense[13]))
    assert seen == [(0x2A, 0x09), (0x3F, 0x03), (0x28, 0x00)]
    assert good(lu, inquiry(1, 0xB2))[5] == 0xE4


# -- GET LBA STATUS ------------------------------------------------------------------

def lba_status(lba: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def extents(data: bytes) -> list[tuple[int, int, int]]:
    """(LBA, blocks, provisioning status) of each descriptor; checks the length field."""
    assert int.from_bytes(data[:4], "big") == len(data) - 4 and (len(data) - 8) % 16 == 0
    return [struct.unpack_from(">QIB", data, off) for off in range(8, len(data), 16)]


@pytest.mark.parametrize("encrypted", [False, True])
def test_get_lba_status_reports_the_backing_files_holes(tmp_path, kek, encrypted):
    path = tmp_path / "lun.img"
    with open(path, "wb") as f:
        f.truncate(fmt.MIN_DATA_OFFSET + 8 * 1024 * 1024)
    store = open_backstore(str(path))
    if encrypted:
        fmt.create(store, kek, fmt.Binding("k1", "default"), data_offset=fmt.MIN_DATA_OFFSET)
        volume = Volume.open(store, key_source=SyncSource({"k1": kek}, refuse_unknown=False))
    else:
        volume = Volume.open(store, allow_plain=True)
    end = volume.num_blocks
    lu = LogicalUnit(volume, Identity(serial="s"), Limits())
    try:
        assert extents(good(lu, lba_status(0))) == [(0, end, 1)]  # all a hole: deallocated
        good(lu, cdb10(0x2A, 2048, 16), pattern(16))
        good(lu, cdb10(0x2A, 4096, 8), pattern(8))
        assert extents(good(lu, lba_status(0))) == [
            (0, 2048, 1), (2048, 16, 0), (2064, 2032, 1), (4096, 8, 0), (4104, end - 4104, 1)]
        assert extents(good(lu, lba_status(2050)))[0] == (2050, 14, 0)  # starts where asked
        params = unmap_params((2048, 8))
        good(lu, unmap_cdb(len(params)), params)  # a hole again, read as zeroes
        assert extents(good(lu, lba_status(2048)))[:2] == [(2048, 8, 1), (2056, 8, 0)]
        assert good(lu, cdb10(0x28, 2048, 8), length=4096) == bytes(4096)
        # the allocation length cuts the data, not the parameter data length
        short = good(lu, lba_status(0, alloc=24), length=24)
        assert len(short) == 24 and int.from_bytes(short[:4], "big") == 4 + 16
        check(run(lu, lba_status(end))[0], ILLEGAL, 0x21)
        assert (0x9E, 0x12) in {(c.opcode, c.service_action) for c in REGISTRY}
        off = LogicalUnit(volume, Identity(serial="s"), Limits(unmap_supported=False))
        check(run(off, lba_status(0))[0], ILLEGAL, 0x20)
    finally:
        volume.close()


def test_nowait_serves_only_reads_whose_data_is_at_hand(tmp_path) -> None:
    """execute(nowait=True), as the ring thread tries short READs: cached data is read;
    a READ of evicted pages and a WRITE raise WouldBlock having changed nothing; a
    pending unit attention is still reported."""
    path = tmp_path / "plain.img"
    path.write_bytes(bytes(PLAIN_BLOCKS * 512))
    volume = Volume.open(open_backstore(str(path)), allow_plain=True)
    lu = LogicalUnit(volume)
    data = bytes(range(256)) * 16
    good(lu, cdb16(0x8A, 8, 8), data)
    xfer = BytesTransfer(b"", 4096)
    result = lu.execute(cdb16(0x88, 8, 8), xfer, nowait=True)
    assert result.status == 0 and xfer.received == data
    volume.flush()
    for cdb in (cdb16(0x88, 8, 8), cdb10(0x28, 8, 8)):
        refused_once_evicted(path, lambda: lu.execute(cdb, BytesTransfer(b"", 4096),
                                                      nowait=True))
    with pytest.raises(WouldBlock):
        lu.execute(cdb16(0x8A, 8, 8), BytesTransfer(bytes(4096)), nowait=True)
    assert good(lu, cdb16(0x88, 8, 8)) == data  # the write was not run
    lu.post_unit_attention(0x2A, 0x09)
    result, _ = (lu.execute(cdb16(0x88, 8, 8), BytesTransfer(b"", 4096), nowait=True), None)
    check(result, 0x6, 0x2A, 0x09)
    volume.close()


def test_a_read_batch_queues_reads_and_reads_them_together(elu: LogicalUnit) -> None:
    """execute(nowait=batch), as the ring thread tries READs: a READ whose checks pass
    is queued with the reply it will have, and read (decrypted) only by run(); a READ
    that fails its checks, or has no single buffer to read into, is answered at once;
    any other command raises WouldBlock."""
    data = [bytes([i]) * 4096 for i in range(1, 4)]
    for i, block in enumerate(data):
        good(elu, cdb16(0x8A, 8 * i, 8), block)
    batch = elu.read_batch()
    xfers = [BytesTransfer(b"", 4096) for _ in data]
    for i, xfer in enumerate(xfers):
        result = elu.execute(cdb16(0x88, 8 * i, 8) if i else cdb10(0x28, 0, 8), xfer,
                             nowait=batch)
        assert (result.status, result.data_in_len) == (0, 4096)
    assert len(batch) == 3 and all(bytes(x.received) == bytes(4096) for x in xfers)
    bad = elu.execute(cdb16(0x88, elu.backend.num_blocks, 8), BytesTransfer(b"", 4096),
                      nowait=batch)
    check(bad, ILLEGAL, 0x21)
    scattered = BytesTransfer(b"", 4096, contiguous=False)
    result = elu.execute(cdb16(0x88, 8, 8), scattered, nowait=batch)
    assert result.status == 0 and bytes(scattered.received) == data[1]
    with pytest.raises(WouldBlock):
        elu.execute(cdb16(0x8A, 0, 8), BytesTransfer(bytes(4096)), nowait=batch)
    assert len(batch) == 3
    assert batch.run() == [True, True, True] and len(batch) == 0
    assert [bytes(x.received) for x in xfers] == data
    assert good(elu, cdb16(0x88, 0, 8)) == data[0]  # the refused WRITE was not run
