"""Volumes keyed through a real embedded KMS: replicas, outages, refusals, rotation, cache.

Every scenario runs the gateway's own path: a volume opened with the key
lookup service as its key source, a real PyKMIP server on 127.0.0.1, real
files.  "Gateway A" and "gateway B" are two enrolled identities.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from kmsenv import KmsEnv

from gateway import format as fmt
from gateway.format import disk as fmt_disk
from gateway.backstore import open_backstore
from gateway.kms import Config
from gateway.kms.audit import AuditLog
from gateway.kms.cache import KeyCache
from gateway.kms.lookup import KeyLookupService
from gateway.kms.pool import ManagerPool
from gateway.volume import DataProtectError, NotReadyError, State, Volume

DATA = os.urandom(256 * 1024)
SIZE = 8 << 20


def make_evlu(kms: KmsEnv, path: Path, gateway: str = "gw-a") -> tuple[str, str]:
    """Gateway A's eVLU at ``path`` holding DATA; returns (volume uuid, key id)."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
    with kms.manager(gateway) as manager:
        vol = Volume.open(open_backstore(str(path)), allow_plain=True)
        key_id = manager.provision(str(path))
        kek = manager.fetch(key_id)
        vol.encrypt_on(bytes(kek), fmt.Binding(key_id, "embedded"),
                       data_offset=fmt.MIN_DATA_OFFSET)
        vol.write(0, DATA)
        vol.flush()
        header = vol.header
        assert header is not None
        vol.close()
    assert DATA[:4096] not in path.read_bytes()
    return header.uuid, key_id


def service(kms: KmsEnv, gateway: str, **kwargs: object) -> KeyLookupService:
    audit = AuditLog(kms.config.audit_path, gateway)
    return KeyLookupService(ManagerPool(kms.config, gateway), audit=audit,
                            **kwargs).start()  # type: ignore[arg-type]


def wait_state(vol: Volume, timeout: float = 20.0) -> State:
    deadline = time.monotonic() + timeout
    while vol.state == State.WAITING_FOR_KEY and time.monotonic() < deadline:
        time.sleep(0.02)
    return vol.state


def open_volume(path: Path, lookups: KeyLookupService, readonly: bool = False) -> Volume:
    return Volume.open(open_backstore(str(path), readonly=readonly), key_source=lookups)


def test_replicas_open_on_another_gateway_with_no_key_step(kms: KmsEnv, tmp_path: Path) -> None:
    img = tmp_path / "img"
    make_evlu(kms, img)
    copy, larger = tmp_path / "copy", tmp_path / "larger"
    shutil.copyfile(img, copy)
    shutil.copyfile(img, larger)
    with open(larger, "r+b") as f:
        f.truncate(2 * SIZE)  # copied onto a larger LUN
    with service(kms, "gw-b") as lookups:
        for path, capacity in ((copy, SIZE), (larger, 2 * SIZE)):
            vol = open_volume(path, lookups)
            assert wait_state(vol) == State.ENCRYPTED, vol.reason
            assert vol.num_blocks * vol.block_size == capacity - fmt.MIN_DATA_OFFSET
            assert bytes(vol.read(0, len(DATA) // 512)) == DATA
            vol.close()


@pytest.mark.parametrize("who", ["other CA", "impostor"])
def test_unauthorized_gateways_get_no_key_and_no_plaintext(kms: KmsEnv, tmp_path: Path,
                                                           who: str) -> None:
    from gateway.kms import pki
    img = tmp_path / "img"
    make_evlu(kms, img)
    rogue = Config(tmp_path / "rogue")
    ca = pki.make_ca("other CA") if who == "other CA" else None
    (rogue.root / "gateways" / "gw-a").mkdir(parents=True)
    pair = pki.issue(ca, "gw-a") if ca else pki.make_ca("gw-a")  # impostor: self-signed, same CN
    pki.write_pair(pair, rogue.root / "gateways/gw-a/cert.pem", rogue.root / "gateways/gw-a/key.pem")
    profile = kms.config.profile()
    rogue.save_profile(profile.__class__("embedded", profile.addresses, profile.ca))
    lookups = KeyLookupService(ManagerPool(rogue, "gw-a")).start()
    try:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.NO_KEY
        assert "refused" in vol.reason
        with pytest.raises(DataProtectError):
            vol.read(0, 8)
        with pytest.raises(DataProtectError):
            vol.write(0, bytes(4096))
        vol.close()
    finally:
        lookups.stop()


def test_kms_outage_waits_then_unlocks_without_restart(own_kms: KmsEnv, tmp_path: Path) -> None:
    img = tmp_path / "img"
    make_evlu(own_kms, img)
    with service(own_kms, "gw-b", retry_max=0.5) as lookups:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.ENCRYPTED
        vol.write(1000, b"\x5a" * 4096)  # an unlocked volume keeps serving through an outage
        own_kms.stop()
        vol.write(1008, b"\xa5" * 4096)
        assert vol.rescan() is None  # same header, key still verified
        reopened = open_volume(img, lookups)
        time.sleep(1.5)
        assert reopened.state == State.WAITING_FOR_KEY  # retried, never refused
        with pytest.raises(NotReadyError) as err:
            reopened.write(0, bytes(512))
        assert (err.value.asc, err.value.ascq) == (0x04, 0x01)
        own_kms.start()
        back = time.monotonic()
        assert wait_state(reopened, 10) == State.ENCRYPTED
        assert time.monotonic() - back < 5  # within the retry cap of the KMS's return
        assert bytes(reopened.read(0, len(DATA) // 512)) == DATA
        assert bytes(reopened.read(1000, 8)) == b"\x5a" * 4096
        assert bytes(reopened.read(1008, 8)) == b"\xa5" * 4096
        vol.close()
        reopened.close()


def test_destroyed_key_gives_no_key(kms: KmsEnv, tmp_path: Path) -> None:
    img = tmp_path / "img"
    _uuid, key_id = make_evlu(kms, img)
    kms.manager("gw-a").destroy(key_id)
    with service(kms, "gw-b") as lookups:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.NO_KEY
        assert "no such key" in vol.reason
        vol.close()


def test_token_pointing_at_another_key_is_a_digest_mismatch(kms: KmsEnv, tmp_path: Path) -> None:
    img = tmp_path / "img"
    make_evlu(kms, img)
    other = kms.manager("gw-a").provision("someone-else")  # an existing, authorized key
    dev = open_backstore(str(img))
    header = fmt.read(dev).header
    obj = header.metadata.to_json()
    obj["tokens"]["0"]["key_id"] = other
    fmt_disk.write(dev, header.with_metadata(fmt.Metadata(obj, header.hdr_size)))
    dev.close()
    before = img.read_bytes()
    with service(kms, "gw-b") as lookups:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.NO_KEY
        assert "does not open" in vol.reason
        with pytest.raises(DataProtectError):
            vol.write(0, bytes(512 * 8))
        vol.close()
    assert img.read_bytes() == before  # nothing written


def test_rotation_semantics_for_replicas(kms: KmsEnv, tmp_path: Path) -> None:
    """After a rotation the old KEK is deactivated: a replica made before it opens again only
    once re-synced (its header still names the old key)."""
    img, stale = tmp_path / "img", tmp_path / "stale"
    volume_uuid, old_id = make_evlu(kms, img)
    shutil.copyfile(img, stale)
    with service(kms, "gw-a") as lookups, kms.manager("gw-a") as manager:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.ENCRYPTED
        new_id = manager.provision(volume_uuid)
        new_kek = manager.fetch(new_id)
        vol.rotate(old_id, bytes(new_kek), fmt.Binding(new_id, "embedded"))
        manager.deactivate(old_id)
        vol.close()
    resynced = tmp_path / "resynced"
    shutil.copyfile(img, resynced)
    with service(kms, "gw-b") as lookups:
        fresh = open_volume(resynced, lookups)
        assert wait_state(fresh) == State.ENCRYPTED
        assert bytes(fresh.read(0, len(DATA) // 512)) == DATA
        old = open_volume(stale, lookups)
        assert wait_state(old) == State.NO_KEY
        assert "deactivated" in old.reason
        fresh.close()
        old.close()


def test_lookups_are_deduplicated_and_refusals_not_retried(kms: KmsEnv, tmp_path: Path) -> None:
    img = tmp_path / "img"
    _uuid, key_id = make_evlu(kms, img)
    copies = []
    for i in range(3):
        copies.append(tmp_path / f"c{i}")
        shutil.copyfile(img, copies[-1])
    with service(kms, "gw-b") as lookups:
        # Queue three volumes on one key before the worker runs: one KMS call.
        with lookups._cond:
            vols = [open_volume(p, lookups) for p in copies]
        assert [wait_state(v) for v in vols] == [State.ENCRYPTED] * 3
        assert lookups.kms_calls == 1
        for v in vols:
            v.close()
    kms.manager("gw-a").destroy(key_id)
    with service(kms, "gw-b", refusal_hold=60) as lookups:
        first = open_volume(copies[0], lookups)
        assert wait_state(first) == State.NO_KEY
        calls = lookups.kms_calls
        for _ in range(20):  # re-opened and re-requested in a loop: answered from memory
            again = open_volume(copies[1], lookups)
            assert wait_state(again) == State.NO_KEY
            again.close()
        assert lookups.kms_calls == calls
        first.close()


def test_key_cache_serves_an_outage_and_honours_a_destroy(own_kms: KmsEnv,
                                                          tmp_path: Path) -> None:
    img = tmp_path / "img"
    _uuid, key_id = make_evlu(own_kms, img)
    config = own_kms.config
    settings = config.settings()
    settings.key_cache = {"enabled": True, "ttl": 600}
    config.save_settings(settings)
    cache = KeyCache.from_config(config)
    assert cache is not None
    kek = own_kms.manager("gw-b").fetch(key_id)
    with service(own_kms, "gw-b", cache=cache) as lookups:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.ENCRYPTED  # fetched from the KMS, and cached
        vol.close()
    cached = (config.cache_dir / "keys.json").read_bytes()
    assert kek.hex().encode() not in cached and bytes(kek) not in cached
    assert ((config.cache_dir / "keys.json").stat().st_mode & 0o777) == 0o600
    # The key is destroyed in the KMS, then the KMS goes down before the gateway hears of it.
    own_kms.manager("gw-a").destroy(key_id)
    own_kms.stop()
    with service(own_kms, "gw-b", cache=cache, retry_max=0.5) as lookups:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.ENCRYPTED  # served from the cache during the outage
        assert bytes(vol.read(0, 8)) == DATA[:4096]
        own_kms.start()
        deadline = time.monotonic() + 15
        while vol.state == State.ENCRYPTED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vol.state == State.NO_KEY  # the destroy is honoured once the KMS answers
        with pytest.raises(DataProtectError):
            vol.read(0, 8)
        vol.close()
    assert cache.get("embedded", key_id) is None
    events = [json.loads(line) for line in config.audit_path.read_text().splitlines()]
    sources = {(e["event"], e["outcome"], e.get("source")) for e in events}
    assert ("lookup", "granted", "cache") in sources
    assert ("revalidate", "refused", None) in sources


def test_key_cache_entries_expire_and_are_bound_to_their_key(tmp_path: Path) -> None:
    now = [1000.0]
    cache = KeyCache(tmp_path / "keys.json", os.urandom(32), ttl=60, clock=lambda: now[0])
    kek = os.urandom(32)
    cache.put("p", "k1", kek)
    assert cache.get("p", "k1") == kek
    assert cache.get("p", "k2") is None and cache.get("q", "k1") is None
    doc = json.loads((tmp_path / "keys.json").read_text())
    doc["p/k2"] = doc["p/k1"]  # an entry copied under another key id does not decrypt
    (tmp_path / "keys.json").write_text(json.dumps(doc))
    assert cache.get("p", "k2") is None
    other_host = KeyCache(tmp_path / "keys.json", os.urandom(32), ttl=60, clock=lambda: now[0])
    assert other_host.get("p", "k1") is None  # another host key cannot read it
    cache.put("p", "k1", kek)
    now[0] += 61
    assert cache.get("p", "k1") is None  # expired


def test_audit_log_has_every_event_and_no_key_bytes(kms: KmsEnv, tmp_path: Path) -> None:
    img = tmp_path / "img"
    volume_uuid, key_id = make_evlu(kms, img)
    kek = kms.manager("gw-a").fetch(key_id)
    with service(kms, "gw-b") as lookups:
        vol = open_volume(img, lookups)
        assert wait_state(vol) == State.ENCRYPTED
        vol.close()
    lines = kms.config.audit_path.read_text().splitlines()
    mine = [json.loads(x) for x in lines if volume_uuid in x]
    assert {(e["event"], e["outcome"], e["gateway"]) for e in mine} >= {
        ("lookup", "granted", "gw-b")}
    assert all(e["key_id"] == key_id for e in mine)
    assert (kms.config.audit_path.stat().st_mode & 0o777) == 0o600
    _assert_no_key_material(kek, [kms.config.audit_path, kms.config.kms_dir / "server.log"])
    with pytest.raises(TypeError, match="never log key material"):
        AuditLog(tmp_path / "a.log", "gw").record("x", secret=bytes(kek))


def _assert_no_key_material(kek: bytes | bytearray, paths: list[Path]) -> None:
    import base64
    forms = [bytes(kek), kek.hex().encode(), kek.hex().upper().encode(),
             base64.b64encode(bytes(kek)), base64.b64encode(bytes(kek)).rstrip(b"=")]
    for path in paths:
        data = path.read_bytes()
        for form in forms:
            assert form not in data, f"key material in {path}"
