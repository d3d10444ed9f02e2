"""targetcli-evlu and stock targetcli in the appliance, against gatewayd on the real kernel.

The session's key server, and a gatewayd of this module's own (configuration
directory /var/lib/evlu-tc/conf, control socket /run/evlu-tc/control.sock) so
the other VM tests' setup is untouched; every LIO object made here is
removed with stock ``targetcli clearconfig`` at the end.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.vm import Appliance
from conftest import REPORT  # tests/conftest.py: the "evlu test report" summary

from .test_smoke import host

MIB = 1 << 20

pytestmark = pytest.mark.vm

GUEST = Path(__file__).resolve().parent / "guest"
DIR = "/var/lib/evlu-tc"
CONF = f"{DIR}/conf"
SOCKET = "/run/evlu-tc/control.sock"
ENV = (f"set -e; . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "
       f"export EVLU_CONFIG_DIR={CONF} EVLU_GATEWAY=appliance EVLU_GATEWAYD_SOCKET={SOCKET} "
       "TARGETCLI_HOME=/root/.targetcli-evlu; ")
UNIT_ENV = (f"-p EnvironmentFile=/etc/default/evlu-gateway --setenv=EVLU_CONFIG_DIR={CONF} "
            "--setenv=EVLU_GATEWAY=appliance")
IQN = "iqn.2003-01.org.linux-iscsi.evlu-appliance:evlu"


def sh(vm: Appliance, script: str, timeout: float = 300, check: bool = True) -> str:
    result = vm.agent.run(ENV + script, timeout=timeout, check=check)
    return result.text


def shell(vm: Appliance, command: str, check: bool = True) -> str:
    """``targetcli-evlu COMMAND`` non-interactively; its output (stderr too)."""
    return sh(vm, f"targetcli-evlu {command} 2>&1", check=check)


@pytest.fixture(scope="module")
def gatewayd(appliance: Appliance, guest_kms: str) -> Iterator[None]:
    """gatewayd with an LIO configuration of one demo-mode target (no ACL: any initiator)."""
    sh(appliance, f"""
        {guest_kms.format(dir=CONF)}
        cat > {CONF}/lio.toml <<'EOF'
[[targets]]
iqn = "{IQN}"
[[targets.tpgs]]
generate_node_acls = true
authentication = false
demo_mode_write_protect = false
attributes = {{ cache_dynamic_acls = 1 }}
EOF
        systemd-run --unit=evlu-tc-gatewayd {UNIT_ENV} /opt/evlu-gateway/venv/bin/python \\
            -m gateway.daemon --socket {SOCKET} --dbus off --metrics off
        for i in $(seq 120); do test -S {SOCKET} && break; sleep 1; done
    """, timeout=400)
    yield
    appliance.agent.run(ENV + "targetcli clearconfig confirm=True", check=False, timeout=120)
    appliance.agent.run(["systemctl", "stop", "evlu-tc-gatewayd"], check=False)


def test_status_create_and_initiator(appliance: Appliance, gatewayd: None) -> None:
    # (configshell says once that it has no preferences file yet: the last line is ours)
    assert shell(appliance, "/encryption status").splitlines()[-1].split() == [
        "NAME", "STATE", "KEY", "ID", "KMS", "SIZE", "SECTOR", "EXPORTED", "AS"]
    out = shell(appliance, f"/encryption create lun0 {DIR}/lun0.img size=64M target={IQN}")
    assert "Created eVLU lun0: ENCRYPTED" in out
    # create target=IQN exported it through gatewayd's lio.toml: the target's first LUN
    lun = 0
    assert f"exported as {IQN}/tpg1/lun{lun}" in out
    url = f"iscsi://127.0.0.1:{appliance.ports['iscsi']}/{IQN}/{lun}"
    deadline = time.monotonic() + 120
    while subprocess.run(["iscsi-inq", url], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "lun0 never became ready"
        time.sleep(2)
    assert "Vendor:EVLU" in host("iscsi-inq", url)
    assert f"Total size:{48 << 20}" in host("iscsi-readcapacity16", url)

    listing = shell(appliance, "ls /encryption")
    assert f"lun0" in listing and f"exported as {IQN}/tpg1/lun{lun}" in listing
    assert "ENCRYPTED, key" in listing and "48.0MiB, 512B sectors" in listing
    # stock targetcli sees the same LUN (its user:evlu backstore list needs the handler on
    # D-Bus, which this gatewayd leaves off)
    stock = sh(appliance, f"targetcli ls /iscsi/{IQN}/tpg1/luns 2>&1")
    assert f"lun{lun}" in stock and "user/lun0.img-" in stock
    ours = shell(appliance, "ls /")
    assert "backstores" in ours and "iscsi" in ours and "encryption" in ours

    failed = appliance.agent.run(ENV + "targetcli-evlu /encryption shred lun0 2>&1",
                                 check=False)
    assert failed.rc == 1 and "repeat with confirm=yes" in failed.text
    assert "ENCRYPTED" in shell(appliance, "/encryption info lun0")


def test_interactive_session_on_a_pty(appliance: Appliance, gatewayd: None) -> None:
    inputs = ["set global auto_save_on_exit=false color_mode=false", "cd /encryption",
              "status", "info lu\t", "", "help rotate", "rotate nope"]
    screens = json.loads(appliance.agent.run(
        ENV + "python3 - targetcli-evlu " + " ".join(shlex.quote(i) for i in inputs),
        stdin=(GUEST / "pty_session.py").read_bytes(), timeout=300).stdout)
    by_input = {s["input"]: s["screen"] for s in screens}
    assert "eVLUs are under /encryption" in screens[0]["screen"]
    assert by_input["cd /encryption"].rstrip().endswith("/encryption>")
    assert "lun0" in by_input["status"] and "ENCRYPTED" in by_input["status"]
    assert "info lun0 " in by_input["info lu\t"]  # TAB completed the name
    assert f"backing store: {DIR}/lun0.img" in by_input[""]
    assert "rotate name [kms]" in by_input["help rotate"]
    assert "no eVLU named 'nope'" in by_input["rotate nope"]
    assert by_input["(exited)"] == "exit status 0"


STOCK_IQN = "iqn.2003-01.org.linux-iscsi.evlu-appliance:stock"
INITIATOR = "iqn.2003-01.org.example.evlu:stock-host"


def _lun_opts(appliance: Appliance, lun: int, offset: int = 0, size: int = 0) -> str:
    """QEMU --image-opts for mapped LUN ``lun`` of the stock target, as INITIATOR."""
    iscsi = (f"transport=tcp,portal=127.0.0.1:{appliance.ports['iscsi']},target={STOCK_IQN},"
             f"lun={lun},initiator-name={INITIATOR}")
    if not size:
        return f"driver=iscsi,{iscsi}"
    return f"driver=raw,offset={offset},size={size}," + ",".join(
        f"file.{kv}" for kv in f"driver=iscsi,{iscsi}".split(","))


def _write(appliance: Appliance, lun: int, offset: int, data: bytes, tmp: Path) -> None:
    (tmp / "data").write_bytes(data)
    out = host("qemu-io", "--image-opts", _lun_opts(appliance, lun), "-c",
               f"write -s {tmp / 'data'} {offset} {len(data)}", timeout=300)
    assert f"wrote {len(data)}/{len(data)} bytes" in out, out


def _read(appliance: Appliance, lun: int, offset: int, size: int, tmp: Path) -> bytes:
    host("qemu-img", "convert", "-O", "raw", "--image-opts",
         _lun_opts(appliance, lun, offset, size), str(tmp / "read"), timeout=300)
    return (tmp / "read").read_bytes()


def test_encrypt_a_stock_fileio_backstore(appliance: Appliance, gatewayd: None,
                                          tmp_path: Path) -> None:
    """A fileio backstore made with stock targetcli, exported as LUN 2 of a target of its
    own and mapped as LUN 1 of an ACL, becomes an eVLU at the same place."""
    img = f"{DIR}/disk1.img"
    sh(appliance, f"""
        targetcli /backstores/fileio create disk1 {img} 64M
        targetcli /iscsi create {STOCK_IQN}
        targetcli /iscsi/{STOCK_IQN}/tpg1 set attribute authentication=0
        targetcli /iscsi/{STOCK_IQN}/tpg1/luns create /backstores/fileio/disk1 lun=2 \\
            add_mapped_luns=false
        targetcli /iscsi/{STOCK_IQN}/tpg1/acls create {INITIATOR} add_mapped_luns=false
        targetcli /iscsi/{STOCK_IQN}/tpg1/acls/{INITIATOR} create mapped_lun=1 \\
            tpg_lun_or_backstore=2 write_protect=false
    """)
    old = b"STOCK-PLAINTEXT-" * (MIB // 16)
    _write(appliance, 1, 20 * MIB, old, tmp_path)
    assert sh(appliance, f"grep -c STOCK-PLAINTEXT {img} || true").strip() == "1"

    refused = appliance.agent.run(ENV + "targetcli-evlu /encryption encrypt name=disk1 2>&1",
                                  check=False)
    assert refused.rc == 1 and f"the data on {img} unreadable for good" in refused.text
    assert f"/iscsi/{STOCK_IQN}/tpg1/lun2" in refused.text and "confirm=yes" in refused.text
    assert "fileio/disk1" in shell(appliance, "/encryption help encrypt")

    start = time.monotonic()
    out = shell(appliance, "/encryption encrypt name=fileio/disk1 confirm=yes")
    REPORT.append(f"targetcli-evlu encrypt of a 64 MiB stock fileio backstore: "
                  f"{time.monotonic() - start:.0f} s")
    assert f"fileio/disk1 is now eVLU disk1 on {img}: ENCRYPTED, key" in out
    assert f"re-created /iscsi/{STOCK_IQN}/tpg1/lun2 -> user/disk1" in out
    assert f"re-created /iscsi/{STOCK_IQN}/tpg1/acls/{INITIATOR}/mapped_lun1 -> lun2" in out

    # stock targetcli and targetcli-evlu show the same: no fileio/disk1, LUN 2 is user/disk1
    assert "disk1" not in sh(appliance, "targetcli ls /backstores/fileio 2>&1")
    luns = sh(appliance, f"targetcli ls /iscsi/{STOCK_IQN}/tpg1 2>&1")
    assert "lun2" in luns and "user/disk1" in luns and "mapped_lun1" in luns
    assert f"exported as {STOCK_IQN}/tpg1/lun2" in shell(appliance, "ls /encryption")

    url = f"iscsi://127.0.0.1:{appliance.ports['iscsi']}/{STOCK_IQN}/1"
    deadline = time.monotonic() + 120
    while (inq := subprocess.run(["iscsi-inq", "-i", INITIATOR, url], capture_output=True,
                                 text=True)).returncode != 0:
        assert time.monotonic() < deadline, f"disk1 never answered: {inq.stderr}"
        time.sleep(2)
    assert "Vendor:EVLU" in inq.stdout
    assert f"Total size:{48 * MIB}" in host("iscsi-readcapacity16", "-i", INITIATOR, url)
    assert _read(appliance, 1, 4 * MIB, MIB, tmp_path) == bytes(MIB)  # blank: old data gone
    new = b"EVLU-PLAINTEXT--" * (MIB // 16)
    _write(appliance, 1, 4 * MIB, new, tmp_path)
    assert _read(appliance, 1, 4 * MIB, MIB, tmp_path) == new
    assert sh(appliance, f"head -c 8 {img} | od -An -tx1").split() == \
        ["4c", "55", "4b", "53", "ba", "be", "00", "02"]  # LUKS2
    assert sh(appliance, f"grep -c -e EVLU-PLAINTEXT -e STOCK-PLAINTEXT {img} || true"
              ).strip() == "0"

    # saveconfig keeps it: cleared and restored, LIO has it again and gatewayd serves it
    shell(appliance, f"saveconfig savefile={DIR}/saved.json")
    saved = json.loads(sh(appliance, f"cat {DIR}/saved.json"))
    assert {(so["plugin"], so["name"], so.get("config")) for so in saved["storage_objects"]
            if so["name"] == "disk1"} == {("user", "disk1", f"evlu/{img}")}
    target = next(t for t in saved["targets"] if t["wwn"] == STOCK_IQN)
    assert [(x["index"], x["storage_object"]) for x in target["tpgs"][0]["luns"]] == [
        (2, "/backstores/user/disk1")]
    assert [(m["index"], m["tpg_lun"], m["write_protect"])
            for m in target["tpgs"][0]["node_acls"][0]["mapped_luns"]] == [(1, 2, False)]
    sh(appliance, f"targetcli clearconfig confirm=True && targetcli restoreconfig "
                  f"{DIR}/saved.json")
    deadline = time.monotonic() + 120
    while "state: ENCRYPTED" not in (info := shell(appliance, "/encryption info disk1",
                                                   check=False)):
        assert time.monotonic() < deadline, f"disk1 not served after restoreconfig: {info}"
        time.sleep(2)
    assert f"exported: {STOCK_IQN}/tpg1/lun2" in info
    assert _read(appliance, 1, 4 * MIB, MIB, tmp_path) == new
