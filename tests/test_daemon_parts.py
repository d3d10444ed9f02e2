"""gatewayd's parts in process: the control protocol, options, health, the header watcher,
the metered command path over the simulated kernel, sd_notify."""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
from pathlib import Path

import pytest
from keysources import SyncSource
from pagecache import refused_once_evicted
from prometheus_client import CollectorRegistry, generate_latest

from gateway import format as fmt
from gateway.backstore import WouldBlock, open_backstore
from gateway.daemon import health
from gateway.daemon.__main__ import build_parser, resolve
from gateway.daemon.control import (Code, ControlError, Dispatcher, LineBuffer, Request,
                                    encode_request, parse_response)
from gateway.daemon.luns import LunTable, name_for
from gateway.daemon.metrics import (CountingAuditLog, GatewayCollector, LunMeter, LunSample,
                                    Metered)
from gateway.daemon.notify import notify
from gateway.daemon.watcher import HeaderWatcher, fingerprint
from gateway.scsi import Identity, Limits, LogicalUnit
from gateway.scsi.transfer import BytesTransfer
from gateway.tcmu.cfgstring import DeviceConfig
from gateway.tcmu.device import RingDevice
from gateway.tcmu.doorbell import EventfdDoorbell
from gateway.tcmu.simkernel import SimKernel
from gateway.volume import State, Volume

MIB = 1 << 20


# -- control protocol ------------------------------------------------------------------------

def dispatcher() -> Dispatcher:
    def boom(_params: dict) -> None:
        raise RuntimeError("secret detail")
    return Dispatcher({"echo": lambda params: params, "boom": boom}, lambda *_: None)


def answer(line: bytes) -> dict:
    return json.loads(dispatcher().answer(line))


def test_requests_get_results_and_precise_errors() -> None:
    assert answer(encode_request(Request(7, "echo", {"a": 1}))) == {"id": 7, "result": {"a": 1}}
    assert answer(b'{"id": "x", "method": "echo"}')["result"] == {}
    cases = {
        b"not json": "parse_error", b"[]": "invalid_request",
        b'{"id": 1}': "invalid_request", b'{"id": 1, "method": "echo", "params": 3}':
        "invalid_request", b'{"id": 1.5, "method": "echo"}': "invalid_request",
        b'{"id": 1, "method": "echo", "extra": 1}': "invalid_request",
        b'{"id": 1, "method": "nope"}': "unknown_method", b'{"id": 1, "method": "boom"}':
        "internal",
    }
    for line, code in cases.items():
        assert answer(line)["error"]["code"] == code, line
    assert answer(b'{"id": 9, "method": "nope"}')["id"] == 9
    assert "secret detail" not in answer(b'{"id": 1, "method": "boom"}')["error"]["message"]


def test_responses_decode_to_results_or_errors() -> None:
    assert parse_response(b'{"id": 1, "result": [1]}') == (1, [1])
    with pytest.raises(ControlError) as err:
        parse_response(b'{"id": 1, "error": {"code": "not_found", "message": "no LUN x"}}')
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "no LUN x")
    with pytest.raises(ControlError):
        parse_response(b'{"id": 1}')


def test_line_buffer_splits_and_limits() -> None:
    buf = LineBuffer(limit=16)
    assert buf.feed(b'{"a"') == [] and buf.feed(b':1}\n\n{"b":2}\n{') == [b'{"a":1}', b'{"b":2}']
    with pytest.raises(ControlError):
        buf.feed(b"x" * 17)


# -- options ------------------------------------------------------------------------------------

def test_options_from_a_toml_file_under_the_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "gatewayd.conf"
    conf.write_text('socket = "/run/x/c.sock"\nwatch-interval = 2\nmetrics = "off"\n'
                    'log-format = "text"\nworkers = 8\n')
    options, log_format, _ = resolve(build_parser().parse_args(
        ["--config", str(conf), "--workers", "2", "--no-netlink"]))
    assert (options.socket, options.watch_interval, options.metrics, options.workers,
            options.netlink, log_format) == (Path("/run/x/c.sock"), 2, None, 2, False, "text")
    options, log_format, _ = resolve(build_parser().parse_args(["--metrics", "[::1]:9000"]))
    assert options.metrics == ("::1", 9000) and log_format == "json" and options.netlink
    assert not options.pin_devices  # the default
    assert resolve(build_parser().parse_args(["--pin-devices"]))[0].pin_devices
    conf.write_text("pin-devices = true\n")
    assert resolve(build_parser().parse_args(["--config", str(conf)]))[0].pin_devices
    conf.write_text("colour = 1\n")
    with pytest.raises(SystemExit, match="unknown option"):
        resolve(build_parser().parse_args(["--config", str(conf)]))


# -- health -------------------------------------------------------------------------------------

def test_health() -> None:
    fine = health.Facts(beat_age=1, beat_limit=15, control_alive=True, lookups_alive=True)
    assert health.assess(fine).ready
    stuck = health.assess(health.Facts(beat_age=60, beat_limit=15, control_alive=True,
                                       lookups_alive=True))
    assert not stuck.live and not stuck.ready and not stuck.checks["loop"]["ok"]
    waiting = health.assess(health.Facts(beat_age=1, beat_limit=15, control_alive=True,
                                         lookups_alive=True, unattached=["lun0"]))
    assert waiting.live and not waiting.ready and "lun0" in waiting.checks["luns"]["detail"]
    broken = health.assess(health.Facts(beat_age=1, beat_limit=15, control_alive=True,
                                        lookups_alive=True, broken_devices=["so1"]))
    assert not broken.live


# -- LUN table and header watcher ------------------------------------------------------------

def make_evlu(path: Path, kek: bytes, key_id: str, size: int = 4 * MIB) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    dev = open_backstore(str(path))
    fmt.create(dev, kek, fmt.Binding(key_id, "default"), data_offset=fmt.MIN_DATA_OFFSET)
    dev.close()


def test_the_watcher_rescans_on_a_seqid_change_and_the_lu_gets_a_unit_attention(
        tmp_path: Path) -> None:
    keks = {"k1": os.urandom(32), "k2": os.urandom(32)}
    path, other = tmp_path / "a.img", tmp_path / "b.img"
    make_evlu(path, keks["k1"], "k1")
    make_evlu(other, keks["k2"], "k2")
    table = LunTable(SyncSource(keks))
    lun = table.add(str(path), name=None, target=None, plain=False)
    assert lun.volume.state == State.ENCRYPTED and lun.name == "a"
    lu = LogicalUnit(lun.volume)
    now = [0.0]
    watcher = HeaderWatcher(table.all, interval=5, clock=lambda: now[0])
    assert watcher.due() and watcher.tick() == []  # first look: the baseline
    assert not watcher.due()
    with open(path, "r+b") as f:  # bump the primary's seqid (its checksum breaks: UNKNOWN)
        f.seek(16)
        seqid = struct.unpack(">Q", f.read(8))[0]
        f.seek(16)
        f.write(struct.pack(">Q", seqid + 5))
    now[0] = 5.0
    assert watcher.due()
    changed = watcher.tick()
    assert [c[0] for c in changed] == [lun]
    # the secondary copy still holds the old header: the volume stays keyed
    assert lun.volume.state == State.ENCRYPTED
    with open(other, "rb") as src, open(path, "r+b") as dst:  # re-synced from elsewhere
        dst.write(src.read())
    now[0] = 10.0
    (_, transition), = watcher.tick()
    assert transition is not None and "new UUID" in transition.reason
    assert lun.volume.state == State.ENCRYPTED and lun.volume.unlocked_by == "k2"
    assert lu.take_unit_attention() == (0x28, 0x00)  # medium may have changed
    now[0] = 15.0
    assert watcher.tick() == []
    table.close()


def test_fingerprint_sees_a_header_appear_and_the_store_grow(tmp_path: Path) -> None:
    path = tmp_path / "p.img"
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
    dev = open_backstore(str(path))
    before = fingerprint(dev)
    assert before == (4 * MIB, b"", b"")
    fmt.create(dev, os.urandom(32), fmt.Binding("k", "default"), data_offset=fmt.MIN_DATA_OFFSET)
    after = fingerprint(dev)
    assert after[1][:6] == b"LUKS\xba\xbe" and after[2][:6] == b"SKUL\xba\xbe"
    os.truncate(path, 8 * MIB)
    assert fingerprint(dev)[0] == 8 * MIB
    dev.close()


def test_devices_share_the_lun_volume(tmp_path: Path) -> None:
    kek = os.urandom(32)
    path = tmp_path / "shared.img"
    make_evlu(path, kek, "k1")
    table = LunTable(SyncSource({"k1": kek}))
    added = table.add(str(path), name="db", target=None, plain=False)
    link = tmp_path / "link.img"
    link.symlink_to(path)
    volume = table.acquire(DeviceConfig(str(link)), "so_db")
    assert volume is added.volume and table.by_device("so_db") is added
    table.release(volume, "so_db")
    assert table.find("db").devices == set()  # added: stays
    fresh = table.acquire(DeviceConfig(str(tmp_path / "shared.img")), "so_x")
    assert fresh is volume
    other = tmp_path / "plain.img"
    other.write_bytes(bytes(MIB))
    plain = table.acquire(DeviceConfig(str(other), allow_plain=True), "so_plain")
    assert plain.state == State.UNENCRYPTED and table.find(str(other)).name == "so_plain"
    table.release(plain, "so_plain")  # only a device held it: gone, and closed
    with pytest.raises(ControlError):
        table.find("so_plain")
    assert plain.state == State.UNKNOWN
    assert name_for("/dev/vg0/db-snap.2024") == "db-snap" and name_for("/x/a b:c.img") == "a_b_c"
    table.close()


# -- metrics over the real ring path ---------------------------------------------------------

def test_metered_commands_through_the_ring(tmp_path: Path) -> None:
    kek = os.urandom(32)
    path = tmp_path / "m.img"
    make_evlu(path, kek, "k1")
    volume = Volume.open(open_backstore(str(path)), key_source=SyncSource({"k1": kek}))
    k = SimKernel(cmdr_size=64 << 10, data_size=1 << 20)
    meter = LunMeter()
    lu = LogicalUnit(volume, Identity(serial="1"), Limits(max_transfer_blocks=256))
    dev = RingDevice(memoryview(mmap.mmap(k.memfd, k.size)),
                     EventfdDoorbell(k.to_handler, k.to_kernel), Metered(lu, meter),
                     workers=2, name="m").start()
    try:
        ids = [k.queue(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), os.urandom(4096)),
               k.queue(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0), data_in_len=4096),
               k.queue(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 16, 0), data_in_len=8192),
               k.queue(bytes(6))]
        done: dict[int, int] = {}
        while len(done) < len(ids):
            k.wait(5)
            done.update((c.cmd_id, c.status) for c in k.reap())
    finally:
        dev.stop()
        k.close()
    ops, nbytes, _, buckets = meter.snapshot()
    assert ops == [2, 1, 1] and nbytes[:2] == [12288, 4096]
    assert [sum(b) for b in buckets] == ops
    audit = CountingAuditLog(None, "gw")
    audit.record("lookup", outcome="granted", source="cache", key_id="k1")
    audit.record("lookup", outcome="refused", key_id="k2")
    registry = CollectorRegistry()
    registry.register(GatewayCollector(lambda: [LunSample("m", volume.state, meter)], audit,
                                       lambda: {"embedded": False}, lambda: True))
    text = generate_latest(registry).decode()
    assert 'evlu_lun_ops_total{lun="m",op="read"} 2.0' in text
    assert 'evlu_lun_bytes_total{lun="m",op="write"} 4096.0' in text
    assert 'evlu_lun_latency_seconds_count{lun="m",op="read"} 2.0' in text
    assert 'evlu_key_lookups_total{outcome="granted",source="cache"} 1.0' in text
    assert 'evlu_key_lookups_total{outcome="refused",source="kms"} 1.0' in text
    assert 'evlu_kms_reachable{profile="embedded"} 0.0' in text
    volume.close()


def test_metered_batched_reads_count_once(tmp_path: Path) -> None:
    """A READ queued in a read batch counts when the batch reads it; one the batch
    cannot read counts only when it runs again (as a worker runs it)."""
    kek = os.urandom(32)
    path = tmp_path / "m.img"
    make_evlu(path, kek, "k1")
    volume = Volume.open(open_backstore(str(path)), key_source=SyncSource({"k1": kek}))
    meter = LunMeter()
    metered = Metered(LogicalUnit(volume, Identity(serial="1"), Limits()), meter)
    read = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
    assert metered.execute(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0),
                           BytesTransfer(os.urandom(4096))).status == 0
    batch = metered.read_batch()
    assert batch is not None
    assert metered.execute(read, BytesTransfer(b"", 4096), nowait=batch).status == 0
    assert meter.snapshot()[0] == [0, 1, 0]  # queued: not yet
    assert batch.run() == [True]
    assert meter.snapshot()[0][:2] == [1, 1] and meter.snapshot()[1][0] == 4096
    volume.flush()

    def attempt() -> None:
        metered.execute(read, BytesTransfer(b"", 4096), nowait=batch)
        if not batch.run()[0]:
            raise WouldBlock

    refused_once_evicted(path, attempt)
    reads_before = meter.snapshot()[0][0]
    assert metered.execute(read, BytesTransfer(b"", 4096)).status == 0  # the worker's run
    assert meter.snapshot()[0][0] == reads_before + 1
    volume.close()


# -- sd_notify ---------------------------------------------------------------------------------

def test_notify_sends_one_datagram(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "n.sock"))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
        assert sock.recv(64) == b"READY=1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0evlu-test-notify-%d" % os.getpid())
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@evlu-test-notify-%d" % os.getpid()})
        assert sock.recv(64) == b"STOPPING=1"
    assert not notify("READY=1", {})
