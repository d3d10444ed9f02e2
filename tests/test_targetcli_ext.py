"""targetcli-evlu's /encryption node in a real configshell shell, against a real gatewayd
(subprocess, no LIO: --no-netlink, --dbus off) and the real embedded KMS.

The stock targetcli root needs configfs, so here /encryption hangs under a plain
configshell root; the whole shell (stock targetcli tree + /encryption) is
driven in the appliance (tests/vm/test_targetcli_ext.py)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from configshell_fb import ConfigNode, ConfigShell, ExecutionError
from configshell_fb.console import Console

from gateway.daemon.client import ControlClient, NotRunningError
from kmsenv import KmsEnv
from targetcli_ext.control import Gatewayd
from targetcli_ext import stock
from targetcli_ext.encryption import UIEncryption

MIB = 1 << 20


class Gatewaydproc:
    """``python -m gateway.daemon`` on a socket of its own, as gateway gw-a."""

    def __init__(self, kms: KmsEnv, root: Path) -> None:
        self.socket = root / "run" / "control.sock"
        (root / "uio").mkdir()
        (root / "core").mkdir()
        self.log = root / "gatewayd.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.daemon", "--socket", str(self.socket),
                 "--metrics", "off", "--dbus", "off", "--no-netlink", "--no-lio", "--log-format", "text",
                 "--sysfs", str(root / "uio"), "--configfs", str(root / "core")],
                env=kms.env("gw-a"), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                ControlClient(self.socket).close()
                return
            except NotRunningError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gatewayd did not answer: {self.log.read_text()}")

    def call(self, method: str, **params: object) -> object:
        with ControlClient(self.socket) as client:
            return client.call(method, params)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Shell:
    """A configshell shell with /encryption; ``run`` returns what a command displayed."""

    def __init__(self, socket: Path, prefs: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.shell = ConfigShell(str(prefs))
        # configshell's Console is a Borg whose streams default to the sys.stdout of
        # import time: give it streams of this test's own
        self.screen = io.StringIO()
        Console(stdout=self.screen, stderr=self.screen)
        self.node = UIEncryption(ConfigNode("/", shell=self.shell), Gatewayd(socket),
                                 lambda: None)
        self.capsys = capsys

    def run(self, line: str) -> str:
        """What the command displayed (the shell's console, then what evlu printed)."""
        self.capsys.readouterr()
        self.screen.seek(0)
        self.screen.truncate()
        self.shell.run_cmdline(line)
        return self.screen.getvalue() + self.capsys.readouterr().out

    def fails(self, line: str) -> str:
        with pytest.raises(ExecutionError) as info:
            self.run(line)
        return str(info.value)

    def complete(self, command: str, param: str, text: str, **given: str) -> list[str]:
        method = getattr(self.node, f"ui_complete_{command}")
        return list(method(given, text, param))


@pytest.fixture
def gatewayd(kms: KmsEnv, tmp_path: Path) -> Iterator[Gatewaydproc]:
    proc = Gatewaydproc(kms, tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def sh(kms: KmsEnv, gatewayd: Gatewaydproc, tmp_path: Path,
       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Shell:
    for name, value in kms.env("gw-a").items():
        monkeypatch.setenv(name, value)
    return Shell(gatewayd.socket, tmp_path / "prefs", capsys)


def _row(status: str, name: str) -> list[str]:
    return next(line.split() for line in status.splitlines() if line.split()[:1] == [name])


def test_create_ls_status_info_and_rotate(sh: Shell, tmp_path: Path) -> None:
    img = tmp_path / "lun0.img"
    sh.run(f"/encryption create lun0 {img} size=64M sector_size=4096")
    status = sh.run("/encryption status")
    assert status.splitlines()[0].split() == ["NAME", "STATE", "KEY", "ID", "KMS", "SIZE",
                                              "SECTOR", "EXPORTED", "AS"]
    name, state, key_id, kms, size, sector, exported = _row(status, "lun0")
    assert (state, kms, size, sector, exported) == ("ENCRYPTED", "embedded", "48.0MiB", "4096",
                                                    "-")
    info = sh.run("/encryption info lun0")
    assert f"backing store: {img}" in info and f"key: {key_id} (KMS profile embedded)" in info
    listing = sh.run("ls /encryption")
    assert "lun0" in listing and f"ENCRYPTED, key {key_id} (KMS embedded), 48.0MiB" in listing
    assert sh.run("/encryption/lun0 info") == info

    sh.run("/encryption rotate lun0")
    new_key = _row(sh.run("/encryption status"), "lun0")[2]
    assert new_key != key_id
    audit = sh.run("/encryption audit lun0 count=50")
    assert f"rotate ok" in audit and f"old_key_id={key_id}" in audit
    assert "provision ok" in audit and "format ok" in audit


def test_bind_unbind_shred(sh: Shell, kms: KmsEnv, tmp_path: Path) -> None:
    kms.evlu("kms", "profile", "add", "dr", "--address", f"127.0.0.1:{kms.port}", "--ca",
             str(kms.config.profile().ca), check=True)
    sh.run(f"/encryption create lun1 {tmp_path / 'lun1.img'} size=32M")
    first = _row(sh.run("/encryption status"), "lun1")[2]
    assert sh.complete("bind", "kms", "d") == ["dr "]
    sh.run("/encryption bind lun1 kms=dr")
    keys = _row(sh.run("/encryption status"), "lun1")[2].split(",")
    assert len(keys) == 2 and first in keys
    second = next(k for k in keys if k != first)
    assert sh.complete("unbind", "key_id", "", name="lun1") == sorted(keys)
    sh.run(f"/encryption unbind lun1 key_id={first}")
    assert _row(sh.run("/encryption status"), "lun1")[2] == second

    refused = sh.fails("/encryption shred lun1")
    assert "confirm=yes" in refused and second in refused
    assert _row(sh.run("/encryption status"), "lun1")[1] == "ENCRYPTED"
    sh.run("/encryption shred lun1 confirm=yes")
    assert _row(sh.run("/encryption status"), "lun1")[1] == "NO_KEY"


def test_encrypt_a_plain_lun_then_off(sh: Shell, gatewayd: Gatewaydproc, tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"old data" * 4096 + bytes(32 * MIB - 8 * 4096))
    gatewayd.call("lun.add", path=str(plain), name="plain0", plain=True)
    assert _row(sh.run("/encryption status"), "plain0")[1:3] == ["UNENCRYPTED", "-"]

    refused = sh.fails("/encryption encrypt plain0")
    assert "unreadable" in refused and "confirm=yes" in refused
    assert plain.read_bytes()[:8] == b"old data"
    sh.run("/encryption encrypt plain0 confirm=yes")
    row = _row(sh.run("/encryption status"), "plain0")
    assert row[1] == "ENCRYPTED" and row[2] != "-"
    assert plain.read_bytes()[:6] == b"LUKS\xba\xbe"
    assert "not a plain backstore" in sh.fails("/encryption encrypt plain0 confirm=yes")

    assert "confirm=yes" in sh.fails("/encryption off plain0")
    sh.run("/encryption off plain0 confirm=yes")
    assert _row(sh.run("/encryption status"), "plain0")[1:3] == ["UNENCRYPTED", "-"]


def test_errors_say_what_to_do(sh: Shell, tmp_path: Path) -> None:
    assert "give its size" in sh.fails(f"/encryption create x {tmp_path / 'none.img'}")
    assert "512 or 4096" in sh.fails(f"/encryption create x {tmp_path / 'a.img'} 1M "
                                     "sector_size=1000")
    assert "no eVLU named 'nope'" in sh.fails("/encryption info nope")
    small = tmp_path / "small.img"
    sh.fails(f"/encryption create tiny {small} size=1M")  # smaller than the data offset
    assert not small.exists()  # a file created for a failed format is removed
    sh.run(f"/encryption create lun2 {tmp_path / 'lun2.img'} size=32M wipe=no")
    assert "exists already" in sh.fails(f"/encryption create lun2 {tmp_path / 'b.img'} 32M")


def test_completion_and_help(sh: Shell, tmp_path: Path) -> None:
    sh.run(f"/encryption create lun3 {tmp_path / 'lun3.img'} size=32M wipe=no")
    assert sh.complete("info", "name", "lu") == ["lun3 "]
    assert sh.complete("create", "sector_size", "4") == ["4096 "]
    assert sh.complete("shred", "confirm", "y") == ["yes "]
    assert sh.complete("create", "file_or_dev", str(tmp_path / "lun3")) == [
        str(tmp_path / "lun3.img")]
    help_text = sh.run("/encryption help shred")
    assert "shred name [confirm]" in help_text and "every copy and replica" in help_text


def test_without_gatewayd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sh = Shell(tmp_path / "absent.sock", tmp_path / "prefs", capsys)
    assert "gatewayd is not running" in sh.run("ls")
    message = sh.fails("/encryption status")
    assert "systemctl start evlu-gatewayd" in message


# -- encrypt of a stock fileio/block backstore: naming, exports, refusals -------------------

GIB = 1 << 30
IQN_A = "iqn.2003-01.org.example:a"
IQN_B = "iqn.2003-01.org.example:b"
INIT = "iqn.1994-05.com.example:host1"


def _so(plugin: str, name: str, path: str = "", size: int = GIB, block_size: int = 512,
        **kw: Any) -> stock.StorageObject:
    return stock.StorageObject(plugin, name, path or f"/srv/{name}.img", size, block_size, **kw)


def _stock(name: str, lio: stock.Snapshot, evlus: tuple[str, ...] = ()) -> str:
    """The storage object ``name`` means, as PLUGIN/NAME."""
    so = stock.resolve(name, evlus, lio)
    assert so is not None, f"{name} is an eVLU"
    return so.qualified


def _plan(name: str, lio: stock.Snapshot) -> stock.Plan:
    so = stock.resolve(name, (), lio)
    assert so is not None
    return stock.plan(so, lio, {})


def _lio() -> stock.Snapshot:
    """disk1 (fileio) is LUN 0 of target a and LUN 3 of target b; disk2 (block) is LUN 1
    of a; ACLs map them under other numbers, one read-only."""
    sos = (_so("fileio", "disk1"), _so("block", "disk2", "/dev/vdb"), _so("ramdisk", "r0", ""),
           _so("pscsi", "p0", ""), _so("user", "rbd0", "", config="rbd/pool/img"),
           _so("user", "lun9", "", config="evlu//srv/lun9.img"), _so("fileio", "dup"),
           _so("block", "dup", "/dev/vdc"))
    luns = (stock.LunExport("iscsi", IQN_A, 1, 0, "a0", ("fileio", "disk1")),
            stock.LunExport("iscsi", IQN_A, 1, 1, "a1", ("block", "disk2")),
            stock.LunExport("iscsi", IQN_B, 1, 3, "b3", ("fileio", "disk1")),
            stock.LunExport("iscsi", IQN_B, 1, 0, "b0", ("block", "disk2")))
    mapped = (stock.MappedExport("iscsi", IQN_A, 1, INIT, 5, 0, False, "m5"),
              stock.MappedExport("iscsi", IQN_A, 1, INIT, 6, 1, False, "m6"),
              stock.MappedExport("iscsi", IQN_B, 1, INIT, 0, 3, True, "m0"),
              stock.MappedExport("iscsi", IQN_B, 1, INIT, 1, 0, False, "m1"))
    return stock.Snapshot(sos, luns, mapped)


def test_stock_names() -> None:
    lio = _lio()
    assert _stock("fileio/disk1", lio) == "fileio/disk1"
    assert _stock("/backstores/block/disk2", lio) == "block/disk2"
    assert _stock("iblock/disk2", lio) == "block/disk2"
    assert _stock("disk1", lio, ("lun9",)) == "fileio/disk1"
    # an eVLU's name means the eVLU, even when a stock backstore has it too
    assert stock.resolve("disk1", ["disk1"], lio) is None
    assert stock.resolve("lun9", ["lun9"], None) is None
    with pytest.raises(ExecutionError, match="could be fileio/dup or block/dup"):
        stock.resolve("dup", [], lio)
    with pytest.raises(ExecutionError, match="no backstore fileio/nope; eVLUs: lun9; stock "
                                             "backstores: block/disk2, block/dup, fileio/disk1"):
        stock.resolve("fileio/nope", ["lun9"], lio)
    with pytest.raises(ExecutionError, match="no eVLU or backstore named 'nope'"):
        stock.resolve("nope", [], lio)
    with pytest.raises(ExecutionError, match="LIO .* cannot be read here"):
        stock.resolve("fileio/disk1", [], None)


def test_stock_exports_recorded() -> None:
    lio = _lio()
    plan = _plan("fileio/disk1", lio)
    assert [(x.wwn, x.lun, x.alias) for x in plan.luns] == [(IQN_A, 0, "a0"), (IQN_B, 3, "b3")]
    assert [(m.wwn, m.mapped_lun, m.tpg_lun, m.write_protect, m.alias) for m in plan.mapped] == [
        (IQN_A, 5, 0, False, "m5"), (IQN_B, 0, 3, True, "m0")]
    assert plan.capacity == GIB - 16 * MIB
    assert [str(x) for x in plan.exports] == [
        f"/iscsi/{IQN_A}/tpg1/lun0", f"/iscsi/{IQN_B}/tpg1/lun3",
        f"/iscsi/{IQN_A}/tpg1/acls/{INIT}/mapped_lun5 -> lun0",
        f"/iscsi/{IQN_B}/tpg1/acls/{INIT}/mapped_lun0 -> lun3 (write-protected)"]
    bs = "/backstores/user:evlu/disk1"
    assert stock.commands(plan.exports, bs) == [
        f"/iscsi/{IQN_A}/tpg1/luns create {bs} lun=0 add_mapped_luns=false",
        f"/iscsi/{IQN_B}/tpg1/luns create {bs} lun=3 add_mapped_luns=false",
        f"/iscsi/{IQN_A}/tpg1/acls/{INIT} create mapped_lun=5 tpg_lun_or_backstore=0 "
        "write_protect=false",
        f"/iscsi/{IQN_B}/tpg1/acls/{INIT} create mapped_lun=0 tpg_lun_or_backstore=3 "
        "write_protect=true"]
    other = _plan("block/disk2", lio)
    assert [(x.wwn, x.lun) for x in other.luns] == [(IQN_A, 1), (IQN_B, 0)]
    assert [(m.wwn, m.mapped_lun) for m in other.mapped] == [(IQN_A, 6), (IQN_B, 1)]
    unexported = stock.Snapshot((_so("fileio", "lonely"),))
    assert stock.plan(unexported.storage_objects[0], unexported, {}).exports == []


@pytest.mark.parametrize(("so", "why"), [
    (_so("ramdisk", "r0", ""), "keeps its data in memory"),
    (_so("pscsi", "p0", ""), "passes SCSI commands through"),
    (_so("user", "rbd0", "", config="rbd/pool/img"), "served by a TCMU handler"),
    (_so("user", "lun9", "", config="evlu//srv/lun9.img"), "a user:evlu backstore already"),
    (_so("fileio", "x", size=16 * MIB), "holds 16777216 bytes .* header area"),
    (_so("fileio", "x", block_size=1024), "1024-byte blocks"),
    (_so("block", "x", "/dev/vdd", readonly=True), "read-only"),
    (_so("fileio", "x", luks=True), "begins with a LUKS header already"),
    (_so("fileio", "x", "/srv/a,b.img"), "user:evlu cannot serve /srv/a,b.img"),
    (_so("fileio", "x", problem="No such file"), "cannot be read: No such file"),
    (_so("fileio", "lun9"), "an eVLU named lun9 exists already"),
    (_so("fileio", "rbd0"), "a user backstore named rbd0 exists already"),
    (_so("fileio", "x", "/srv/served.img"), "gatewayd serves /srv/served.img already, as "
                                            "eVLU lun9"),
    (_so("fileio", "x", "/srv/disk1.img"), "/srv/disk1.img is also the store of fileio/disk1"),
])
def test_stock_refusals(so: stock.StorageObject, why: str) -> None:
    lio = _lio()
    lio = stock.Snapshot(lio.storage_objects + (so,), lio.luns, lio.mapped)
    with pytest.raises(ExecutionError, match=f"cannot encrypt {so.qualified}: .*{why}"):
        stock.plan(so, lio, {"lun9": "/srv/served.img"})


def test_stock_limits_and_alua() -> None:
    smallest = _so("fileio", "x", size=16 * MIB + 4096, block_size=4096)
    assert stock.plan(smallest, stock.Snapshot((smallest,)), {}).capacity == 4096
    alua = stock.Snapshot((_so("fileio", "x"),), (
        stock.LunExport("iscsi", IQN_A, 1, 0, "a0", ("fileio", "x"), "fast_path"),))
    with pytest.raises(ExecutionError, match="LUN /iscsi/.*/lun0 is in the ALUA group fast_path"):
        stock.plan(alua.storage_objects[0], alua, {})


class FrozenLio(stock.RtsSteps):
    """LIO as a fixed snapshot, for the checks made before anything changes: every
    change fails the test."""

    def __init__(self, snapshot: stock.Snapshot) -> None:
        self.snapshot = snapshot

    def observe(self) -> stock.Snapshot:
        return self.snapshot

    def remove(self, plan: stock.Plan) -> None:
        raise AssertionError(f"{plan.source} removed")

    def restore(self, plan: stock.Plan) -> list[stock.Failure]:
        raise AssertionError(f"{plan.source} restored")


def test_encrypt_stock_asks_first(sh: Shell, tmp_path: Path) -> None:
    img = tmp_path / "disk1.img"
    img.write_bytes(b"old data" + bytes(32 * MIB - 8))
    lio = stock.Snapshot((_so("fileio", "disk1", str(img), 32 * MIB), _so("ramdisk", "r0", "")),
                         (stock.LunExport("iscsi", IQN_A, 1, 4, "a4", ("fileio", "disk1")),))
    sh.node.lio = FrozenLio(lio)
    refused = sh.fails("/encryption encrypt fileio/disk1")
    assert f"the data on {img} unreadable for good" in refused and "confirm=yes" in refused
    assert ("blank eVLU of 16.0MiB, exported where fileio/disk1 is: "
            f"/iscsi/{IQN_A}/tpg1/lun4") in refused
    assert "keeps its data in memory" in sh.fails("/encryption encrypt r0 confirm=yes")
    assert img.read_bytes()[:8] == b"old data"
    assert sh.complete("encrypt", "name", "") == ["fileio/disk1 "]
    sh.run(f"/encryption create lun4 {tmp_path / 'lun4.img'} size=32M wipe=no")
    assert sh.complete("encrypt", "name", "") == ["fileio/disk1 "]  # lun4 is encrypted already
    assert "fileio/disk1" in sh.run("/encryption help encrypt")


class FailingLio(FrozenLio):
    """LIO as a fixed snapshot whose changes are recorded; making the user:evlu backstore
    fails when ``create_fails``."""

    def __init__(self, snapshot: stock.Snapshot, *, create_fails: bool) -> None:
        super().__init__(snapshot)
        self.create_fails = create_fails
        self.calls: list[str] = []

    def remove(self, plan: stock.Plan) -> None:
        self.calls.append(f"remove {plan.source}")

    def restore(self, plan: stock.Plan) -> list[stock.Failure]:
        self.calls.append(f"restore {plan.source}")
        return []

    def create_evlu(self, plan: stock.Plan, size: int, serial: str) -> None:
        self.calls.append(f"create {plan.source.name}")
        if self.create_fails:
            raise OSError("configfs said no")

    def export(self, plan: stock.Plan, plugin: str,
               name: str) -> tuple[list[stock.Export], list[stock.Failure]]:
        raise AssertionError("exported after a failure")


def _disk1(tmp_path: Path) -> tuple[Path, stock.Snapshot]:
    img = tmp_path / "disk1.img"
    img.write_bytes(b"old data" + bytes(32 * MIB - 8))
    return img, stock.Snapshot((_so("fileio", "disk1", str(img), 32 * MIB),),
                               (stock.LunExport("iscsi", IQN_A, 1, 4, "a4", ("fileio", "disk1")),))


def test_encrypt_stock_puts_everything_back_when_the_format_did_not_start(
        sh: Shell, tmp_path: Path) -> None:
    img, snapshot = _disk1(tmp_path)
    sh.node.lio = lio = FailingLio(snapshot, create_fails=False)
    failed = sh.fails("/encryption encrypt fileio/disk1 confirm=yes kms=nosuch")
    assert f"{img} was not formatted" in failed and "nosuch" in failed, failed
    assert "fileio/disk1 and its 1 export(s) are back as they were" in failed
    assert lio.calls == ["remove fileio/disk1", "restore fileio/disk1"]
    assert img.read_bytes()[:8] == b"old data"


def test_encrypt_stock_says_how_to_finish_when_the_backstore_cannot_be_made(
        sh: Shell, tmp_path: Path) -> None:
    img, snapshot = _disk1(tmp_path)
    sh.node.lio = lio = FailingLio(snapshot, create_fails=True)
    failed = sh.fails("/encryption encrypt fileio/disk1 confirm=yes")
    assert f"{img} is now an eVLU, but its user:evlu backstore could not be made: configfs " \
           "said no" in failed, failed
    assert f"/backstores/user:evlu create disk1 {16 * MIB} evlu/{img}" in failed
    assert f"/iscsi/{IQN_A}/tpg1/luns create /backstores/user:evlu/disk1 lun=4" in failed
    assert lio.calls == ["remove fileio/disk1", "create disk1"]
    assert img.read_bytes()[:6] == b"LUKS\xba\xbe"
