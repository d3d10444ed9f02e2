"""The volume state machine, its I/O rules and its administrative operations."""

from __future__ import annotations

import os
import threading

import pytest
from keysources import SyncSource
from pagecache import refused_once_evicted

from gateway import format as fmt
from gateway.backstore import MemoryBackstore, WouldBlock, open_backstore
from gateway.format import binary
from gateway.volume import (DataProtectError, LbaOutOfRangeError, NotReadyError,
                            OperationRefusedError, State, Transition, Volume, VolumeError)

OFFSET = fmt.MIN_DATA_OFFSET


class RecordingSource:
    """A key source that records requests; tests answer them."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []

    def request(self, volume: Volume, bindings: list[fmt.EvluToken]) -> None:
        self.requests.append([b.key_id for b in bindings])


def opened(dev: MemoryBackstore, **kw) -> tuple[Volume, list[Transition]]:
    seen: list[Transition] = []
    vol = Volume(dev, **kw)
    vol.add_listener(lambda v, t: seen.append(t))
    vol.rescan()
    return vol, seen


def test_waiting_then_encrypted(small_evlu, kek):
    dev, _, dek = small_evlu
    source = RecordingSource()
    vol, seen = opened(dev, key_source=source)
    assert vol.state == State.WAITING_FOR_KEY and source.requests == [["k1"]]
    with pytest.raises(NotReadyError) as info:
        vol.read(0, 1)
    assert (info.value.asc, info.value.ascq) == (0x04, 0x01)
    with pytest.raises(NotReadyError):
        vol.write(0, bytes(512))
    assert vol.offer_kek("k1", kek) == State.ENCRYPTED
    assert [t.new for t in seen] == [State.WAITING_FOR_KEY, State.ENCRYPTED]
    assert vol.block_size == 512
    assert vol.num_blocks == (dev.size - OFFSET) // 512


def test_synchronous_key_source_does_not_deadlock(small_evlu, kek):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    assert vol.state == State.ENCRYPTED


def test_wrong_key_means_no_key_and_nothing_written(small_evlu):
    dev, _, _ = small_evlu
    before = dev.data
    vol, _ = opened(dev, key_source=RecordingSource())
    assert vol.offer_kek("k1", os.urandom(32)) == State.NO_KEY
    with pytest.raises(DataProtectError) as info:
        vol.write(0, b"x" * 512)
    assert (info.value.asc, info.value.ascq) == (0x74, 0x71)
    with pytest.raises(DataProtectError):
        vol.read(0, 1)
    assert dev.data == before


def test_refusal_means_no_key(small_evlu):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({}))
    assert vol.state == State.NO_KEY and "KMS refused k1" in vol.reason


def test_second_binding_still_unlocks_after_first_refused(small_evlu, kek):
    dev, header, dek = small_evlu
    kek2 = os.urandom(32)
    fmt.add_binding(dev, header, dek, kek2, fmt.Binding("dr", "dr-site"))
    vol = Volume.open(dev, key_source=SyncSource({"dr": kek2}))
    assert vol.state == State.ENCRYPTED


def test_io_round_trip_holds_ciphertext_only(small_evlu, kek):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    data = os.urandom(512 * 9)
    vol.write(10, data, fua=True)
    assert vol.read(10, 9) == data
    assert data[:64] not in dev.data
    raw = dev.pread(len(data), OFFSET + 10 * 512)
    assert raw != data and any(raw)


def test_size_spoofing_only_data_segment_visible(small_evlu, kek):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    last = vol.num_blocks - 1
    vol.write(last, b"z" * 512)
    assert vol.read(last, 1) == b"z" * 512
    with pytest.raises(LbaOutOfRangeError):
        vol.read(last, 2)
    with pytest.raises(LbaOutOfRangeError):
        vol.write(-1, bytes(512))
    with pytest.raises(VolumeError):
        vol.write(0, bytes(100))
    header_before = dev.pread(OFFSET, 0)
    vol.write(0, os.urandom(512))  # LBA 0 is the first data sector, not the header
    assert dev.pread(OFFSET, 0) == header_before


def test_unwritten_and_unmapped_read_zero(small_evlu, kek):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    assert not any(vol.read(0, 8))
    vol.write(0, b"\xaa" * 4096)
    vol.unmap(2, 3)
    out = vol.read(0, 8)
    assert out[:1024] == b"\xaa" * 1024 and not any(out[1024:2560]) and out[2560:4096] == b"\xaa" * 1536


@pytest.mark.parametrize("nblocks", [1, 8, 300])  # per-sector, short and batched cipher routes
def test_only_all_zero_ciphertext_sectors_read_as_zero(small_evlu, kek, nblocks):
    """A sector is a hole only when all of its ciphertext is zero: sectors that start
    with zero words but are not all zero still decrypt, whatever their neighbours."""
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    cipher, offset = vol._cipher, vol.data_offset
    raw = bytearray(os.urandom(nblocks * 512))
    kinds = ["data", "hole", "zero-head", "zero-but-last"]
    for i in range(nblocks):
        kind = kinds[i % 4]
        sector = memoryview(raw)[i * 512:(i + 1) * 512]
        if kind == "hole":
            sector[:] = bytes(512)
        elif kind == "zero-head":
            sector[:16] = bytes(16)
            sector[16] |= 1
        elif kind == "zero-but-last":
            sector[:511] = bytes(511)
            sector[511] |= 1
    dev.pwrite(raw, offset + 512 * 7)
    out = vol.read(7, nblocks)
    for i in range(nblocks):
        got, ciphertext = out[i * 512:(i + 1) * 512], bytes(raw[i * 512:(i + 1) * 512])
        want = bytes(512) if kinds[i % 4] == "hole" else cipher.decrypt(ciphertext, 7 + i)
        assert got == want, (i, kinds[i % 4])


def test_plain_volume_passthrough_and_policy():
    dev = MemoryBackstore(1 << 20)
    vol = Volume.open(dev, allow_plain=True)
    assert vol.state == State.UNENCRYPTED and vol.num_blocks == 2048
    vol.write(0, b"p" * 512)
    assert dev.pread(512, 0) == b"p" * 512
    strict = Volume.open(MemoryBackstore(1 << 20))
    assert strict.state == State.UNKNOWN
    with pytest.raises(NotReadyError):
        strict.read(0, 1)


def test_plain_to_encrypted_when_header_appears(kek):
    dev = MemoryBackstore(4 << 20)
    source = RecordingSource()
    vol, seen = opened(dev, allow_plain=True, key_source=source)
    assert vol.state == State.UNENCRYPTED
    fmt.create(dev, kek, fmt.Binding("k1"), data_offset=OFFSET)  # e.g. a replica finished syncing
    t = vol.rescan()
    assert t is not None and t.new == State.WAITING_FOR_KEY and "plain -> encrypted" in t.reason
    assert t.capacity_changed and source.requests == [["k1"]]
    vol.offer_kek("k1", kek)
    assert vol.state == State.ENCRYPTED


def test_header_vanishing_never_falls_back_to_plain(small_evlu, kek):
    dev, header, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}), allow_plain=True)
    vol.write(0, b"s" * 512)
    for offset in (0, 0x4000):
        dev.pwrite(bytes(4096), offset)
    t = vol.rescan()
    assert t is not None and t.new == State.UNKNOWN and "vanished" in t.reason
    with pytest.raises(NotReadyError):
        vol.read(0, 1)
    with pytest.raises(NotReadyError):
        vol.write(0, b"plain" * 100 + bytes(12))
    t = vol.rescan(accept_plain=True)
    assert t is not None and t.new == State.UNENCRYPTED


def test_key_changed_underneath_drops_old_key(small_evlu, kek):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    kek_b = os.urandom(32)
    other = MemoryBackstore(dev.size)  # the replica is re-synced from another source
    fmt.create(other, kek_b, fmt.Binding("kb"), data_offset=OFFSET)
    other.pwrite(os.urandom(512), OFFSET)
    dev.pwrite(other.data, 0)
    vol.key_source = RecordingSource()
    t = vol.rescan()
    assert t is not None and t.new == State.WAITING_FOR_KEY and "another source" in t.reason
    with pytest.raises(NotReadyError):
        vol.read(0, 1)
    vol.offer_kek("kb", kek_b)
    assert vol.state == State.ENCRYPTED


def test_rotation_by_another_gateway_keeps_serving(small_evlu, kek):
    dev, header, dek = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    fmt.rotate(dev, fmt.read(dev).header, 0, dek, os.urandom(32), fmt.Binding("k1-v2"))
    assert vol.rescan() is None and vol.state == State.ENCRYPTED
    assert [t.key_id for t in vol.bindings] == ["k1-v2"]


def test_unreadable_header_is_unknown(small_evlu, kek):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    for offset in (100, 0x4000 + 100):
        dev.pwrite(b"garbage", offset)
    t = vol.rescan()
    assert t is not None and t.new == State.UNKNOWN and "unreadable" in t.reason


def test_rescan_repairs_a_zeroed_primary_header_and_keeps_serving(small_evlu, kek, caplog):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    vol.write(0, b"\x5a" * 512)
    dev.pwrite(bytes(4096), 0)  # the primary binary header wiped under a running LUN
    assert vol.rescan() is None and vol.state == State.ENCRYPTED
    assert f"{dev.path}: header copy rewritten from the secondary copy" in caplog.text
    assert dev.pread(6, 0) == binary.MAGIC_PRIMARY
    result = fmt.read(dev)
    assert result.primary_ok and result.secondary_ok
    assert bytes(vol.read(0, 1)) == b"\x5a" * 512


def test_capacity_change_is_reported(kek):
    dev = MemoryBackstore(4 << 20)
    fmt.create(dev, kek, fmt.Binding("k1"), data_offset=OFFSET)
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    grown = MemoryBackstore.from_bytes(dev.data + bytes(1 << 20))
    vol.backstore = grown  # the LUN's device was grown underneath
    t = vol.rescan()
    assert t is not None and t.capacity_changed and t.new == State.ENCRYPTED
    assert vol.num_blocks == (grown.size - OFFSET) // 512


def test_encrypt_on_and_off():
    dev = MemoryBackstore(4 << 20)
    dev.pwrite(b"old plain data" + bytes(498), OFFSET)
    vol = Volume.open(dev, allow_plain=True)
    kek = os.urandom(32)
    vol.in_use = True
    with pytest.raises(OperationRefusedError, match="in use"):
        vol.encrypt_on(kek, fmt.Binding("k1"), data_offset=OFFSET)
    vol.in_use = False
    vol.encrypt_on(kek, fmt.Binding("k1"), data_offset=OFFSET)
    assert vol.state == State.ENCRYPTED and not any(vol.read(0, 1))  # wiped: reads zeroes
    assert b"old plain data" not in dev.data
    with pytest.raises(OperationRefusedError, match="already encrypted"):
        vol.encrypt_on(kek, fmt.Binding("k2"), data_offset=OFFSET)
    vol.write(0, b"secret" * 85 + bytes(2))
    with pytest.raises(OperationRefusedError, match="confirm"):
        vol.encrypt_off()
    vol.encrypt_off(confirm=True)
    assert vol.state == State.UNENCRYPTED and not fmt.probe(dev)
    assert b"secret" not in dev.data
    assert Volume.open(dev, allow_plain=True).state == State.UNENCRYPTED


def test_encrypt_on_without_wipe_leaves_old_data_unreadable():
    dev = MemoryBackstore(4 << 20)
    dev.pwrite(b"old plain data" + bytes(498), OFFSET)
    vol = Volume.open(dev, allow_plain=True)
    vol.encrypt_on(os.urandom(32), fmt.Binding("k1"), data_offset=OFFSET, wipe=False)
    assert b"old plain data" not in vol.read(0, 1) and any(vol.read(0, 1))


def test_rotate_and_bindings_through_volume(small_evlu, kek):
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    vol.write(5, b"d" * 512)
    kek2, kek3 = os.urandom(32), os.urandom(32)
    vol.rotate("k1", kek2, fmt.Binding("k2"))
    vol.add_binding(kek3, fmt.Binding("k3", "dr"))
    with pytest.raises(OperationRefusedError, match="already bound"):
        vol.add_binding(kek3, fmt.Binding("k3", "dr"))
    vol.remove_binding("k2")
    with pytest.raises(OperationRefusedError, match="last binding"):
        vol.remove_binding("k3")
    fresh = Volume.open(MemoryBackstore.from_bytes(dev.data), key_source=SyncSource({"k3": kek3}))
    assert fresh.state == State.ENCRYPTED and fresh.read(5, 1) == b"d" * 512
    assert Volume.open(MemoryBackstore.from_bytes(dev.data),
                       key_source=SyncSource({"k1": kek, "k2": kek2})).state == State.NO_KEY


def test_operations_need_the_key(small_evlu):
    dev, _, _ = small_evlu
    vol, _ = opened(dev, key_source=RecordingSource())
    with pytest.raises(OperationRefusedError, match="unlocked"):
        vol.rotate("k1", os.urandom(32), fmt.Binding("k2"))


def test_open_repairs_a_damaged_copy(small_evlu, kek, caplog):
    dev, _, _ = small_evlu
    dev.pwrite(b"\xff" * 8, 4096 + 8)
    Volume.open(dev, key_source=SyncSource({"k1": kek}))
    assert not fmt.read(dev).needs_repair
    assert "header copy rewritten from the secondary copy (primary header" in caplog.text


def test_io_concurrent_with_state_changes(small_evlu, kek):
    """Rescans (exclusive) interleave with I/O (shared) without errors or torn data."""
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    errors: list[BaseException] = []

    def io(seed: int) -> None:
        try:
            block = bytes([seed]) * 4096
            for i in range(200):
                vol.write(seed * 8, block)
                assert vol.read(seed * 8, 8) == block
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=io, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for _ in range(50):
        vol.rescan()
    for t in threads:
        t.join()
    assert not errors and vol.state == State.ENCRYPTED


def test_key_material_not_in_repr_or_reason(small_evlu, kek):
    dev, _, dek = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    text = repr(vol) + vol.reason + repr(vol.header)
    assert kek.hex() not in text and bytes(dek).hex() not in text
    assert str(kek) not in text


def test_secondary_magic_alone_is_unknown_not_plain():
    dev = MemoryBackstore(4 << 20)
    dev.pwrite(binary.MAGIC_SECONDARY, 0x4000)
    vol = Volume.open(dev, allow_plain=True)
    assert vol.state == State.UNKNOWN


def test_read_cached_reads_and_decrypts_requests_together(small_evlu, kek):
    """read_cached: every request it can read matches read() (holes as zeroes); one
    it cannot (out of range, not whole blocks) is False and leaves the others be;
    nothing is read while the key is awaited."""
    dev, _, _ = small_evlu
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    vol.write(0, os.urandom(64 * 512))
    vol.unmap(9, 3)
    spans = [(0, 8), (8, 8), (40, 1), (5, 20)]
    bufs = [bytearray(n * 512) for _, n in spans]
    requests = [(lba, buf) for (lba, _), buf in zip(spans, bufs)]
    requests += [(vol.num_blocks - 4, bytearray(8 * 512)), (0, bytearray(100))]
    assert vol.read_cached(requests) == [True, True, True, True, False, False]
    assert [bytes(b) for b in bufs] == [bytes(vol.read(lba, n)) for lba, n in spans]
    assert not any(bufs[1][512:2048])  # blocks 9..11 were unmapped
    waiting, _ = opened(small_evlu[0], key_source=RecordingSource())
    assert waiting.state == State.WAITING_FOR_KEY
    assert waiting.read_cached([(0, bytearray(512))]) == [False]


def test_read_cached_refuses_what_the_page_cache_lacks(tmp_path, kek):
    path = tmp_path / "v.img"
    path.write_bytes(bytes(4 << 20))
    dev = open_backstore(str(path))
    fmt.create(dev, kek, fmt.Binding("k1", "default"), data_offset=fmt.MIN_DATA_OFFSET)
    vol = Volume.open(dev, key_source=SyncSource({"k1": kek}))
    data = os.urandom(8 * 512)
    vol.write(16, data)
    buf = bytearray(8 * 512)
    assert vol.read_cached([(16, buf)]) == [True] and buf == data

    def attempt() -> None:
        if not vol.read_cached([(16, buf)])[0]:
            raise WouldBlock

    vol.flush()
    refused_once_evicted(path, attempt)
    vol.close()
