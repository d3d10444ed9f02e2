"""The LUKS2 format layer: headers, copies, repair, keyslots, bindings."""

from __future__ import annotations

import json
import os

import pytest

from gateway import format as fmt
from gateway.backstore import MemoryBackstore
from gateway.format import af, binary, disk

HDR = 0x4000


def corrupt(dev: MemoryBackstore, offset: int) -> None:
    byte = dev.pread(1, offset)[0]
    dev.pwrite(bytes([byte ^ 0x55]), offset)


def test_create_layout_and_round_trip(small_evlu, kek):
    dev, header, dek = small_evlu
    result = fmt.read(dev)
    assert result.primary_ok and result.secondary_ok and not result.needs_repair
    assert result.header.uuid == header.uuid and result.header.seqid == 1
    md = result.header.metadata
    seg = md.data_segment
    assert (seg.offset, seg.sector_size, seg.encryption, seg.size) == \
        (fmt.MIN_DATA_OFFSET, 512, "aes-xts-plain64", None)
    assert [(t.key_id, t.kms, t.keyslots) for t in md.evlu_tokens()] == [("k1", "default", (0,))]
    assert md.keyslots[0].area_offset == 2 * HDR and md.keyslots[0].area_size == 258048
    assert len(dek) == 64
    assert fmt.unlock(dev, result.header, kek) == dek
    token = md.evlu_tokens()[0]
    assert fmt.unlock(dev, result.header, kek, token) == dek


def test_json_token_shape(small_evlu):
    dev, header, _ = small_evlu
    area = dev.pread(HDR - 4096, 4096)
    obj = json.loads(area[:area.index(b"\0")])
    assert obj["tokens"]["0"] == {"type": "evlu-kmip", "keyslots": ["0"], "key_id": "k1",
                                  "kms": "default"}
    assert obj["config"]["json_size"] == str(HDR - 4096)
    assert list(obj) == ["keyslots", "tokens", "segments", "digests", "config"]


def test_key_never_stored_in_clear(small_evlu, kek):
    dev, _, dek = small_evlu
    raw = dev.data
    assert bytes(dek) not in raw and bytes(dek[:32]) not in raw and kek not in raw


def test_wrong_kek_rejected(small_evlu):
    dev, header, _ = small_evlu
    with pytest.raises(fmt.WrongKeyError):
        fmt.unlock(dev, header, os.urandom(32))


def test_sector_size_4096_and_default_offset(kek):
    dev = MemoryBackstore(20 << 20)
    header, _ = fmt.create(dev, kek, fmt.Binding("k"), sector_size=4096)
    seg = fmt.read(dev).header.metadata.data_segment
    assert (seg.offset, seg.sector_size) == (16 << 20, 4096)
    assert header.metadata.keyslots_size == (16 << 20) - 2 * HDR


@pytest.mark.parametrize("size,sector,offset,message", [
    (4 << 20, 1024, fmt.MIN_DATA_OFFSET, "sector size"),
    (4 << 20, 512, 1 << 20, "below the minimum"),
    (4 << 20, 512, fmt.MIN_DATA_OFFSET + 512, "multiple of 4096"),
    (1 << 20, 512, fmt.MIN_DATA_OFFSET, "too small"),
])
def test_layout_errors(kek, size, sector, offset, message):
    dev = MemoryBackstore(size)
    with pytest.raises(fmt.LayoutError, match=message):
        fmt.create(dev, kek, fmt.Binding("k"), sector_size=sector, data_offset=offset)
    assert not any(dev.data)  # nothing written


def test_min_offset_has_room_for_four_keyslots(small_evlu, kek):
    dev, header, dek = small_evlu
    for i in range(3):
        header = fmt.add_binding(dev, header, dek, os.urandom(32), fmt.Binding(f"extra{i}"))
    assert len(header.metadata.keyslots) == 4
    with pytest.raises(fmt.LayoutError, match="no free keyslot area"):
        fmt.add_binding(dev, header, dek, os.urandom(32), fmt.Binding("fifth"))


def test_refuses_to_overwrite_without_force(small_evlu, kek):
    dev, header, _ = small_evlu
    before = dev.data
    with pytest.raises(fmt.HeaderExistsError):
        fmt.create(dev, kek, fmt.Binding("k2"), data_offset=fmt.MIN_DATA_OFFSET)
    assert dev.data == before
    new, _ = fmt.create(dev, kek, fmt.Binding("k2"), data_offset=fmt.MIN_DATA_OFFSET, force=True)
    assert fmt.read(dev).header.uuid == new.uuid != header.uuid


def test_refuses_a_lone_secondary_signature(kek):
    dev = MemoryBackstore(4 << 20)
    dev.pwrite(binary.MAGIC_SECONDARY, 0x8000)
    with pytest.raises(fmt.HeaderExistsError):
        fmt.create(dev, kek, fmt.Binding("k"), data_offset=fmt.MIN_DATA_OFFSET)


def test_no_header_and_corrupt_header():
    dev = MemoryBackstore(4 << 20)
    with pytest.raises(fmt.NoHeaderError):
        fmt.read(dev)
    dev.pwrite(binary.MAGIC_PRIMARY + b"\x00\x02", 0)
    with pytest.raises(fmt.HeaderCorruptError):
        fmt.read(dev)


@pytest.mark.parametrize("where", [100, 4096 + 10, HDR - 1])  # binary, JSON, JSON padding
def test_damaged_primary_repaired_from_secondary(small_evlu, kek, where):
    dev, header, dek = small_evlu
    corrupt(dev, where)
    result = fmt.read(dev)
    assert not result.primary_ok and result.secondary_ok and result.needs_repair
    assert "primary" in result.problems[0]
    assert fmt.unlock(dev, result.header, kek) == dek
    fmt.repair(dev, result)
    again = fmt.read(dev)
    assert again.primary_ok and again.secondary_ok and again.header.seqid == header.seqid


def test_damaged_secondary_repaired(small_evlu):
    dev, header, _ = small_evlu
    primary_before = dev.pread(HDR, 0)
    corrupt(dev, HDR + 4096 + 3)
    result = fmt.read(dev)
    assert result.primary_ok and not result.secondary_ok
    fmt.repair(dev, result)
    assert fmt.read(dev).secondary_ok
    assert dev.pread(HDR, 0) == primary_before  # the good copy was not touched


def test_primary_wiped_found_by_scan(small_evlu, kek):
    dev, header, dek = small_evlu
    dev.pwrite(bytes(HDR), 0)
    result = fmt.read(dev)
    assert result.header.uuid == header.uuid and not result.primary_ok
    fmt.repair(dev, result)
    assert fmt.read(dev).primary_ok


def test_secondary_scan_finds_other_hdr_sizes(small_evlu):
    """A 64 KiB header (secondary at 64 KiB) is found when the primary is gone."""
    dev, header, _ = small_evlu
    md = header.metadata.to_json()
    md["config"]["json_size"] = str(0x10000 - 4096)
    md["config"]["keyslots_size"] = str(int(md["config"]["keyslots_size"]) - 2 * (0x10000 - HDR))
    for ks in md["keyslots"].values():  # move the area out of the bigger header
        ks["area"]["offset"] = str(2 * 0x10000)
    big = fmt.Header(0x10000, 5, header.uuid, "", "", header.salts,
                     fmt.Metadata(md, 0x10000))
    dev2 = MemoryBackstore(4 << 20)
    disk.write(dev2, big)
    dev2.pwrite(bytes(4096), 0)
    result = fmt.read(dev2)
    assert result.header.hdr_size == 0x10000 and result.header.seqid == 6


def test_stale_copy_loses_to_higher_seqid(small_evlu, kek):
    """A crash after the primary was committed: the primary (newer) wins."""
    dev, header, dek = small_evlu
    new = fmt.add_binding(dev, header, dek, os.urandom(32), fmt.Binding("k2"))
    old_secondary = bytearray(dev.data[HDR:2 * HDR])
    # make the secondary an intact copy of the *old* header
    old = disk.Header(header.hdr_size, header.seqid, header.uuid, header.label, header.subsystem,
                      header.salts, header.metadata)
    json_area = old.metadata.encode()
    bh = binary.BinaryHeader(False, HDR, old.seqid, "", old.uuid, old.subsystem, old.salts[1], HDR)
    dev.pwrite(bh.pack(json_area), HDR)
    result = fmt.read(dev)
    assert result.header.seqid == new.seqid and not result.secondary_ok
    assert len(result.header.metadata.evlu_tokens()) == 2
    assert bytes(old_secondary) != dev.data[HDR:2 * HDR]


def test_foreign_secondary_is_not_trusted(small_evlu, kek):
    dev, header, dek = small_evlu
    other = MemoryBackstore(4 << 20)
    fmt.create(other, kek, fmt.Binding("x"), data_offset=fmt.MIN_DATA_OFFSET)
    other_hdr = fmt.read(other).header
    # a secondary of another device with a higher seqid must not win
    json_area = other_hdr.metadata.encode()
    bh = binary.BinaryHeader(False, HDR, 99, "", other_hdr.uuid, "evlu", other_hdr.salts[1], HDR)
    dev.pwrite(bh.pack(json_area), HDR)
    result = fmt.read(dev)
    assert result.header.uuid == header.uuid and not result.secondary_ok


def test_bindings_add_remove_rotate(small_evlu, kek):
    dev, header, dek = small_evlu
    kek2, kek3 = os.urandom(32), os.urandom(32)
    header = fmt.add_binding(dev, header, dek, kek2, fmt.Binding("dr-key", "dr-site"))
    tokens = {t.key_id: t for t in header.metadata.evlu_tokens()}
    assert tokens["dr-key"].kms == "dr-site"
    assert fmt.unlock(dev, header, kek2, tokens["dr-key"]) == dek
    header = fmt.rotate(dev, header, tokens["k1"].id, dek, kek3, fmt.Binding("k1-v2"))
    tokens = {t.key_id: t for t in fmt.read(dev).header.metadata.evlu_tokens()}
    assert set(tokens) == {"k1-v2", "dr-key"}
    with pytest.raises(fmt.WrongKeyError):
        fmt.unlock(dev, header, kek)
    assert fmt.unlock(dev, header, kek3) == dek
    header = fmt.remove_binding(dev, header, tokens["dr-key"].id)
    assert [t.key_id for t in header.metadata.evlu_tokens()] == ["k1-v2"]
    with pytest.raises(fmt.WrongKeyError):
        fmt.unlock(dev, header, kek2)
    with pytest.raises(fmt.FormatError, match="last binding"):
        fmt.remove_binding(dev, header, header.metadata.evlu_tokens()[0].id)


def test_rotation_does_not_touch_data(small_evlu, kek):
    dev, header, dek = small_evlu
    dev.pwrite(os.urandom(4096), fmt.MIN_DATA_OFFSET)
    data_before = dev.data[fmt.MIN_DATA_OFFSET:]
    fmt.rotate(dev, header, 0, dek, os.urandom(32), fmt.Binding("k2"))
    assert dev.data[fmt.MIN_DATA_OFFSET:] == data_before


def test_retired_keyslot_area_is_wiped(small_evlu, kek):
    dev, header, dek = small_evlu
    area = header.metadata.keyslots[0]
    before = dev.pread(area.area_size, area.area_offset)
    fmt.rotate(dev, header, 0, dek, os.urandom(32), fmt.Binding("k2"))
    assert dev.pread(area.area_size, area.area_offset) != before


def test_operations_refuse_a_wrong_dek(small_evlu):
    dev, header, _ = small_evlu
    with pytest.raises(fmt.WrongKeyError):
        fmt.add_binding(dev, header, os.urandom(64), os.urandom(32), fmt.Binding("k2"))


def test_erase_removes_every_signature(small_evlu):
    dev, header, _ = small_evlu
    fmt.erase(dev, header)
    assert not fmt.probe(dev)
    with pytest.raises(fmt.NoHeaderError):
        fmt.read(dev)
    assert not any(dev.pread(fmt.MIN_DATA_OFFSET, 0))


def test_preserves_unknown_fields(small_evlu, kek):
    """Fields we do not interpret (another tool's token, keyslot priority) survive rewrites."""
    dev, header, dek = small_evlu
    md = header.metadata.to_json()
    md["tokens"]["5"] = {"type": "clevis", "keyslots": [], "jwe": {"x": 1}}
    md["keyslots"]["0"]["priority"] = 2
    header = disk.write(dev, header.with_metadata(fmt.Metadata(md, HDR)))
    header = fmt.add_binding(dev, header, dek, os.urandom(32), fmt.Binding("k2"))
    md2 = fmt.read(dev).header.metadata.to_json()
    assert md2["tokens"]["5"]["jwe"] == {"x": 1} and md2["keyslots"]["0"]["priority"] == 2


def test_af_split_merge_round_trip():
    key = os.urandom(64)
    material = af.split(key, 4000)
    assert len(material) == 64 * 4000
    assert af.merge(material, 64, 4000) == key
    damaged = bytearray(material)
    damaged[1000] ^= 1
    assert af.merge(bytes(damaged), 64, 4000) != key


def test_af_known_answer():
    """diffuse() per cryptsetup: sha256 over a big-endian block index then the chunk."""
    import hashlib
    block = bytes(range(40))
    expected = hashlib.sha256(b"\0\0\0\0" + block[:32]).digest() + \
        hashlib.sha256(b"\0\0\0\1" + block[32:]).digest()[:8]
    assert af._diffuse(block, "sha256") == expected
    # two stripes: material = r || (key xor diffuse(r))
    r, key = os.urandom(40), os.urandom(40)
    last = bytes(a ^ b for a, b in zip(key, af._diffuse(r, "sha256")))
    assert af.merge(r + last, 40, 2) == key


def _edited(dev: MemoryBackstore, header: fmt.Header, edit) -> fmt.Header:
    obj = header.metadata.to_json()
    edit(obj)
    return disk.write(dev, header.with_metadata(fmt.Metadata(obj, HDR)))


@pytest.mark.parametrize("edit,message", [
    (lambda o: o["keyslots"]["0"]["kdf"].update(iterations=50_000_000), "exceeds the limit"),
    (lambda o: o["keyslots"]["0"]["area"].update(key_size=512), "not supported"),
    (lambda o: o["digests"]["0"].update(digest="A" * 11000), "size"),
    (lambda o: o["digests"]["0"].update(iterations=20_000_000), "exceeds the limit"),
    (lambda o: o["keyslots"]["0"].update(kdf={"type": "argon2id", "time": 1000, "memory": 4194304,
                                              "cpus": 4, "salt": "AAAA"}), "exceeds the limit"),
])
def test_hostile_kdf_costs_refused_fast(small_evlu, kek, edit, message):
    """A hostile header cannot stall an unlock: over-limit costs are refused up front."""
    import time
    dev, header, _ = small_evlu
    header = _edited(dev, header, edit)
    start = time.monotonic()
    with pytest.raises(fmt.UnsupportedError, match=message):
        fmt.unlock(dev, header, kek, header.metadata.evlu_tokens()[0])
    assert time.monotonic() - start < 2


def test_broken_keyslot_does_not_block_the_device(small_evlu, kek):
    """As cryptsetup: a keyslot we cannot parse is ignored unless it is the one used."""
    dev, header, dek = small_evlu
    header = fmt.add_binding(dev, header, dek, os.urandom(32), fmt.Binding("k2"))
    header = _edited(dev, header, lambda o: o["keyslots"]["1"]["kdf"].update(type="argon3"))
    md = fmt.read(dev).header.metadata
    assert 1 in md.broken_keyslots and 1 not in md.keyslots
    assert fmt.unlock(dev, header, kek, md.evlu_tokens()[0]) == dek
    # its area is still taken: a new keyslot must not overwrite it
    area1 = int(header.metadata.raw_keyslots[1]["area"]["offset"])
    header = fmt.add_binding(dev, header, dek, os.urandom(32), fmt.Binding("k3"))
    new_slot = next(t for t in header.metadata.evlu_tokens() if t.key_id == "k3").keyslots[0]
    assert header.metadata.keyslots[new_slot].area_offset != area1


def test_malformed_binding_is_reported_not_fatal(small_evlu, kek):
    dev, header, dek = small_evlu
    header = _edited(dev, header, lambda o: o["tokens"].update(
        {"3": {"type": "evlu-kmip", "keyslots": ["0"], "key_id": 7, "kms": "x"}}))
    md = fmt.read(dev).header.metadata
    assert [t.key_id for t in md.evlu_tokens()] == ["k1"]
    assert "key_id" in md.broken_tokens()[3]


def test_full_width_label_is_read_terminated_and_rewritable(small_evlu, kek):
    """A label filling its whole field (no NUL) reads as cryptsetup reads it (the last byte
    is the terminator), and the header can still be rewritten."""
    dev, header, dek = small_evlu
    label = binary.BinaryHeader(True, HDR, 9, "", header.uuid, "evlu", header.salts[0], 0)
    json_area = header.metadata.encode()
    raw = bytearray(label.pack(json_area))
    raw[24:72] = b"L" * 48
    # re-checksum the edited copy with the module's own checksum over the edited bytes
    raw[448:512] = binary._checksum(bytes(raw[:4096]), json_area) + bytes(32)
    dev.pwrite(bytes(raw), 0)
    result = fmt.read(dev)
    assert result.header.label == "L" * 47 and result.header.seqid == 9
    fmt.add_binding(dev, result.header, dek, os.urandom(32), fmt.Binding("k2"))
    assert fmt.read(dev).header.label == "L" * 47
