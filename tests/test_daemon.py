"""gatewayd as it runs: ``python -m gateway.daemon`` in a subprocess, a real KMS on loopback.

The TCMU handler gets empty sysfs/configfs directories and no netlink, so it
serves no kernel device; LUNs come through the control socket (``lun.add``),
and the tests drive that socket as the CLI does: status, lun.add of an eVLU,
of a dd copy and of a copy onto a larger store, a refused key, rescans after
the header changed underneath, the header watcher, metrics, permissions,
errors, SIGTERM, and logs free of key material.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kmsenv import EVLU, KmsEnv, free_port
from test_tcmu_lu import kms_evlu

from gateway.daemon.client import ControlClient, call
from gateway.daemon.control import Code, ControlError

MIB = 1 << 20


class Gatewayd:
    """One gatewayd subprocess with its control socket, metrics port and notify socket."""

    def __init__(self, kms: KmsEnv, root: Path, *extra: str) -> None:
        self.root = root
        for d in ("sys", "cfs", "luns"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.socket = root / "run" / "control.sock"
        self.metrics_port = free_port()
        self.log = root / "gatewayd.log"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(root / "notify.sock"))
        self.notify.settimeout(30)
        env = dict(kms.env("gw-b"), NOTIFY_SOCKET=str(root / "notify.sock"))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.daemon", "--socket", str(self.socket),
                 "--no-netlink", "--no-lio", "--dbus", "off", "--sysfs", str(root / "sys"),
                 "--configfs", str(root / "cfs"), "--metrics", f"127.0.0.1:{self.metrics_port}",
                 "--watch-interval", "0.3", "--kms-probe-interval", "1", *extra],
                env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_notify(self, want: str) -> None:
        while True:
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(f"no {want} from gatewayd: {self.log.read_text()}") \
                    from None
            if want in message.split("\n"):
                return

    def call(self, method: str, **params: Any) -> Any:
        return call(method, params, socket_path=self.socket)

    def evlu(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EVLU, *args, "--socket", str(self.socket)], capture_output=True,
                              text=True, timeout=60)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            return r.read().decode()

    def stop(self) -> float:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - start


def ready(daemon: Gatewayd) -> Iterator[Gatewayd]:
    """``daemon`` once it said READY=1; stopped afterwards."""
    try:
        daemon.wait_notify("READY=1")
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
        daemon.notify.close()


@pytest.fixture(scope="module")
def gwd(kms: KmsEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gatewayd]:
    yield from ready(Gatewayd(kms, tmp_path_factory.mktemp("gatewayd")))


@pytest.fixture
def unwatched(kms: KmsEnv, tmp_path: Path) -> Iterator[Gatewayd]:
    """A gatewayd whose header watcher waits an hour: only explicit rescans see changes."""
    yield from ready(Gatewayd(kms, tmp_path / "gwd", "--watch-interval", "3600"))


def evlu_file(kms: KmsEnv, gwd: Gatewayd, name: str, size: int = 8 * MIB) -> tuple[Path, str]:
    path = gwd.root / "luns" / name
    return path, kms_evlu(kms, path, size, name)


def wait_for(what: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.1)
    return got


def test_ready_status_and_root_only_socket(gwd: Gatewayd) -> None:
    assert stat.S_IMODE(gwd.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(gwd.socket.parent.stat().st_mode) == 0o700
    status = gwd.call("status")
    assert status["health"]["live"] and status["health"]["ready"]
    assert status["gateway"] == "gw-b"
    assert "not available" in status["lio"]
    assert wait_for(lambda: gwd.call("status")["kms"]).get("embedded") is True
    out = gwd.evlu("daemon", "status")
    assert out.returncode == 0 and "live, ready" in out.stdout and "embedded reachable" in \
        out.stdout


def test_lun_add_of_an_evlu_a_dd_copy_and_a_larger_copy(gwd: Gatewayd, kms: KmsEnv) -> None:
    path, key_id = evlu_file(kms, gwd, "orig.img")
    lun = gwd.call("lun.add", path=str(path))
    assert (lun["state"], lun["unlocked_by"], lun["exported"]) == ("ENCRYPTED", key_id, False)
    assert lun["name"] == "orig" and lun["size"] == 8 * MIB - 1040 * 1024
    copy = gwd.root / "luns" / "copy.img"
    subprocess.run(["dd", f"if={path}", f"of={copy}", "bs=1M", "status=none"], check=True)
    out = gwd.evlu("lun", "add", str(copy), "--target", "iqn.2003-01.org.example:t1")
    assert out.returncode == 0, out.stderr
    assert "ENCRYPTED" in out.stdout and "LIO configuration not available" in out.stdout
    bigger = gwd.root / "luns" / "bigger.img"
    with open(bigger, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["dd", f"if={path}", f"of={bigger}", "bs=1M", "conv=notrunc",
                    "status=none"], check=True)
    big = gwd.call("lun.add", path=str(bigger), name="big")
    assert (big["state"], big["uuid"]) == ("ENCRYPTED", lun["uuid"])
    assert big["size"] == 16 * MIB - 1040 * 1024
    info = gwd.call("lun.info", lun="copy")
    assert (info["state"], info["target"], info["unlocked_by"]) == \
        ("ENCRYPTED", "iqn.2003-01.org.example:t1", key_id)
    assert gwd.call("lun.info", lun=str(bigger))["name"] == "big"
    listing = gwd.evlu("lun", "list")
    assert listing.returncode == 0 and all(n in listing.stdout for n in ("orig", "copy", "big"))
    with pytest.raises(ControlError) as err:
        gwd.call("lun.add", path=str(copy))
    assert err.value.code == Code.CONFLICT
    # A shredded key is dropped from every LUN it unlocked: the volume and its copies.
    dropped = gwd.call("lun.drop_key", lun="orig", reason="shredded")
    assert dropped["state"] == "NO_KEY"
    assert {gwd.call("lun.info", lun=n)["state"] for n in ("copy", "big")} == {"NO_KEY"}


def test_refused_key_is_no_key(gwd: Gatewayd, kms: KmsEnv) -> None:
    path, key_id = evlu_file(kms, gwd, "shredded.img")
    with kms.manager("gw-a") as manager:
        manager.destroy(key_id)
    lun = gwd.call("lun.add", path=str(path))
    assert lun["state"] == "NO_KEY" and key_id in lun["reason"]
    other = gwd.root / "luns" / "shredded-copy.img"
    shutil.copyfile(path, other)
    out = gwd.evlu("lun", "add", str(other))
    assert out.returncode == 9 and "NO_KEY" in out.stdout


def test_rescan_picks_up_a_header_that_appeared_and_a_changed_key(unwatched: Gatewayd,
                                                                  kms: KmsEnv) -> None:
    gwd = unwatched
    plain = gwd.root / "luns" / "syncing.img"
    with open(plain, "wb") as f:
        f.truncate(8 * MIB)
    gwd.call("lun.add", path=str(plain), plain=True, name="syncing")
    assert gwd.call("lun.info", lun="syncing")["state"] == "UNENCRYPTED"
    source, key_id = evlu_file(kms, gwd, "source.img")
    other, other_key = evlu_file(kms, gwd, "other.img")
    gwd.call("lun.add", path=str(source), name="replica")
    # the replica finished syncing: the header appeared underneath
    subprocess.run(["dd", f"if={source}", f"of={plain}", "bs=1M", "conv=notrunc",
                    "status=none"], check=True)
    out = gwd.evlu("rescan", "syncing")
    assert out.returncode == 0 and "plain -> encrypted" in out.stdout
    info = wait_for(lambda: (i := gwd.call("lun.info", lun="syncing"))["state"] == "ENCRYPTED"
                    and i)
    assert info["unlocked_by"] == key_id
    # re-synced from another source: a new volume, a new key
    subprocess.run(["dd", f"if={other}", f"of={source}", "bs=1M", "conv=notrunc",
                    "status=none"], check=True)
    done = gwd.call("rescan", lun=str(source))
    assert done[0]["transition"] and "new UUID" in done[0]["transition"]
    info = wait_for(lambda: (i := gwd.call("lun.info", lun="replica"))["state"] == "ENCRYPTED"
                    and i)
    assert info["unlocked_by"] == other_key


def test_the_watcher_notices_a_seqid_change_without_a_rescan(gwd: Gatewayd,
                                                             kms: KmsEnv) -> None:
    path, key_id = evlu_file(kms, gwd, "watched.img")
    lun = gwd.call("lun.add", path=str(path), name="watched")
    assert lun["state"] == "ENCRYPTED"
    rounds = gwd.call("status")["header_checks"]
    wait_for(lambda: gwd.call("status")["header_checks"] >= rounds + 2)
    # a second binding (evlu bind, on this or another gateway) bumps seqid by 2
    bound = kms.evlu("bind", str(path), "--kms", "embedded", gateway="gw-a")
    assert bound.returncode == 0, bound.stderr
    info = wait_for(lambda: (i := gwd.call("lun.info", lun="watched"))["seqid"] !=
                    lun["seqid"] and i, timeout=30)
    assert len(info["key_ids"]) == 2 and info["state"] == "ENCRYPTED"
    assert "header changed underneath" in gwd.log.read_text()


def test_metrics(gwd: Gatewayd, kms: KmsEnv) -> None:
    path, _ = evlu_file(kms, gwd, "metered.img")
    gwd.call("lun.add", path=str(path), name="metered")
    text = gwd.metrics()
    assert 'evlu_lun_state{lun="metered",state="ENCRYPTED"} 1.0' in text
    assert 'evlu_lun_state{lun="metered",state="NO_KEY"} 0.0' in text
    assert 'evlu_lun_ops_total{lun="metered",op="read"} 0.0' in text
    assert 'evlu_lun_latency_seconds_bucket{le="+Inf",lun="metered",op="write"} 0.0' in text
    assert 'evlu_key_lookups_total{outcome="granted",source="kms"}' in text
    assert 'evlu_kms_reachable{profile="embedded"} 1.0' in text
    assert "evlu_gatewayd_ready 1.0" in text
    assert gwd.call("metrics").startswith("# HELP")


def test_precise_errors(gwd: Gatewayd) -> None:
    def code(method: str, **params: Any) -> Code:
        with pytest.raises(ControlError) as err:
            gwd.call(method, **params)
        return err.value.code

    assert code("lun.add", path=str(gwd.root / "luns" / "missing.img")) == Code.NOT_FOUND
    bare = gwd.root / "luns" / "bare.img"
    bare.write_bytes(bytes(MIB))
    assert code("lun.add", path=str(bare)) == Code.NO_HEADER
    assert gwd.evlu("lun", "add", str(bare)).returncode == 3
    assert code("lun.add", path="relative.img") == Code.INVALID_PARAMS
    assert code("lun.add", path=str(bare), bogus=1) == Code.INVALID_PARAMS
    assert code("lun.add", path=7) == Code.INVALID_PARAMS
    assert code("lun.info", lun="nope") == Code.NOT_FOUND
    assert code("frobnicate") == Code.UNKNOWN_METHOD
    assert code("apply") == Code.UNAVAILABLE
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(gwd.socket))
        raw.sendall(b'{"id": 1, "method": \n[1]\n{"id": 5, "method": "health"}\n')
        replies = _lines(raw, 3)
    assert replies[0]["error"]["code"] == "parse_error"
    assert replies[1]["error"]["code"] == "invalid_request"
    assert replies[2]["id"] == 5 and replies[2]["result"]["live"]


def _lines(sock: socket.socket, n: int) -> list[dict[str, Any]]:
    data = b""
    while data.count(b"\n") < n:
        data += sock.recv(65536)
    return [json.loads(line) for line in data.splitlines()[:n]]


def test_a_non_root_peer_is_refused(kms: KmsEnv, tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root (to connect as another user) and /usr/bin/python3")
    # a socket path another user can reach, opened up so only SO_PEERCRED stands in the way
    public = Path(tempfile.mkdtemp(prefix="evlu-gwd-"))
    os.chmod(public, 0o755)
    daemon = Gatewayd(kms, tmp_path / "gwd", "--socket", str(public / "run" / "control.sock"))
    try:
        daemon.wait_notify("READY=1")
        sock = public / "run" / "control.sock"
        os.chmod(sock.parent, 0o755)
        os.chmod(sock, 0o666)
        request = json.dumps({"id": 1, "method": "status"}) + "\n"
        probe = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect(%r); "
                 "s.sendall(%r.encode()); print(s.recv(4096).decode())" % (str(sock), request))
        out = subprocess.run(["/usr/bin/python3", "-I", "-c", probe], user=65534, cwd="/",
                             capture_output=True, text=True, timeout=30)
        assert json.loads(out.stdout)["error"]["code"] == "forbidden", out.stderr
        with ControlClient(sock) as client:  # root still gets in
            assert client.call("health")["live"]
    finally:
        daemon.stop()
        daemon.notify.close()
        shutil.rmtree(public, ignore_errors=True)


def test_logs_are_json_and_hold_no_key_material(gwd: Gatewayd, kms: KmsEnv) -> None:
    path, key_id = evlu_file(kms, gwd, "secret.img")
    gwd.call("lun.add", path=str(path), name="secret")
    with kms.manager("gw-b") as manager:
        kek = bytes(manager.fetch(key_id))
    log = gwd.log.read_bytes()
    records = [json.loads(line) for line in log.decode().splitlines()]
    assert any(r["message"].startswith("secret: added") and r.get("lun") == "secret"
               for r in records)
    for needle in (kek, kek.hex().encode(), kek.hex().upper().encode()):
        assert needle not in log


def test_sigterm_stops_within_bounds(kms: KmsEnv, tmp_path: Path) -> None:
    daemon = Gatewayd(kms, tmp_path / "gwd", "--log-format", "text")
    daemon.wait_notify("READY=1")
    path = tmp_path / "gwd" / "luns" / "a.img"
    kms_evlu(kms, path, 8 * MIB, "sigterm")
    assert daemon.call("lun.add", path=str(path))["state"] == "ENCRYPTED"
    took = daemon.stop()
    assert daemon.proc.returncode == 0 and took < 10
    daemon.wait_notify("STOPPING=1")
    daemon.notify.close()
    assert not daemon.socket.exists()
    assert "gatewayd stopped" in daemon.log.read_text()
    out = subprocess.run([*EVLU, "daemon", "status", "--socket", str(daemon.socket)],
                         capture_output=True, text=True)
    assert out.returncode == 10 and "systemctl start evlu-gatewayd" in out.stderr


def test_a_second_gatewayd_on_the_same_socket_refuses_to_start(gwd: Gatewayd,
                                                                kms: KmsEnv) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.daemon", "--socket", str(gwd.socket),
                          "--no-netlink", "--no-lio", "--dbus", "off", "--metrics", "off", "--sysfs",
                          str(gwd.root / "sys"), "--log-format", "text"],
                         env=kms.env("gw-b"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "another gatewayd answers there" in out.stderr
    assert gwd.call("health")["live"]
