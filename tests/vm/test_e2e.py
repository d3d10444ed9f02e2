"""End to end: the gatewayd issue's scenarios a-h on one appliance.

One setup for the module: the session's KMS (``guest_kms``), an eVLU formatted
through it, ``lio.toml`` with one target whose ACLs use CHAP (mutual) for a host
initiator (libiscsi tools and QEMU's libiscsi driver, through the forwarded port)
and a guest initiator (open-iscsi in the appliance, to its own 127.0.0.1:3260),
discovery authentication, and gatewayd through its systemd unit.  The scenarios
run in the order a, b, c, e, f, h, then d and g together: the module's one reboot.
Each puts its outcome and time into the run's report.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPORT
from cryptography.hazmat.primitives import serialization

from appliance.vm import Appliance
from gateway.kms import pki

from .guest.e2e import BLOCK, acknowledged, damaged

pytestmark = pytest.mark.vm

MIB = 1 << 20
ENV = "set -e; . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "
DIR = "/var/lib/evlu-e2e"
ETC = "/etc/evlu-gateway"
ROGUE = f"{DIR}/rogue"
IQN = "iqn.2003-01.org.example.evlu:e2e"
HOST = "iqn.2024-01.org.example:e2e-host"
GUEST = "iqn.2024-01.org.example:e2e-guest"
PORTAL = "127.0.0.1:3260"  # in the guest: its own portal
GUEST_SCRIPT = Path(__file__).resolve().parent / "guest" / "e2e.py"
DATASET = 4 * MIB  # at LBA 0 of the eVLU (64 MiB file: 48 MiB data segment)
WRITER = (16 * MIB, 4096)  # scenario h: offset and number of 4 KiB blocks
NODE = f"iscsiadm -m node -T {IQN} -p {PORTAL}"
LIO_TOML = f"""
[discovery]
chap = "discovery"

[[targets]]
iqn = "{IQN}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "{DIR}/a.img" }}]
acls = [{{ initiator = "{HOST}", chap = "host", mapped_luns = [{{ lun = 0 }}] }},
        {{ initiator = "{GUEST}", chap = "guest", mapped_luns = [{{ lun = 0 }}] }}]
"""
# The LVM replicas' disk is a loop device: this unit brings it back at boot, before LIO is.
PV_UNIT = f"""[Unit]
Description=evlu e2e test: the loop-backed disk of the LVM replicas
DefaultDependencies=no
After=local-fs.target
Before=rtslib-fb-targetctl.service evlu-gatewayd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/losetup --find {DIR}/pv.img
ExecStart=-/sbin/vgchange -q -ay e2evg
ExecStart=/bin/udevadm settle

[Install]
WantedBy=multi-user.target
"""
LIO_DUMP = f"""
import json
from rtslib_fb import RTSRoot
t = next(t for t in RTSRoot().dump()["targets"] if t["wwn"] == "{IQN}")["tpgs"][0]
print(json.dumps({{"enable": t["enable"], "acls": sorted(a["node_wwn"] for a in t["node_acls"]),
                  "luns": sorted(x["index"] for x in t["luns"])}}))
"""


@dataclass
class E2E:
    vm: Appliance
    chap: dict[str, str]
    dataset: bytes
    guest_disk: str = ""  # LUN 0 through open-iscsi in the guest
    uuid: str = ""
    luns: dict[str, int] = field(default_factory=dict)  # backing path -> LUN
    writer_log: str = ""  # scenario h's acknowledged writes


def sh(vm: Appliance, script: str, timeout: float = 300, check: bool = True) -> str:
    result = vm.agent.run(ENV + script, timeout=timeout, check=check)
    return result.text + result.stderr.decode()


def put(vm: Appliance, path: str, data: str | bytes, mode: str = "644") -> None:
    vm.agent.run(["sh", "-c", f"umask 077; cat > {path}.tmp && chmod {mode} {path}.tmp && "
                              f"mv {path}.tmp {path}"],
                 stdin=data.encode() if isinstance(data, str) else data)


def evlu(vm: Appliance, *commands: list[str]) -> list[dict]:
    """``evlu`` command lines run in one guest process (one Python start)."""
    out = vm.agent.run(["sh", "-c", ENV + f"python3 {DIR}/e2e.py evlu"],
                       stdin=json.dumps(commands).encode(), timeout=600).stdout
    return json.loads(out)


def control(vm: Appliance, method: str, **params: object) -> object:
    """gatewayd's control API (what ``evlu lun ...``/``evlu rescan`` call)."""
    script = ("import json, sys; from gateway.daemon.client import call; "
              "print(json.dumps(call(sys.argv[1], json.loads(sys.argv[2]))))")
    return json.loads(vm.agent.run(["sh", "-c", ENV + 'python3 -c "$0" "$1" "$2"', script,
                                    method, json.dumps(params)], timeout=120).stdout)


def audit(vm: Appliance, after: int = 0) -> list[dict]:
    lines = vm.agent.run(["cat", f"{ETC}/audit.log"]).text.splitlines()
    return [json.loads(line) for line in lines[after:]]


def url(vm: Appliance, lun: int, secret: str, user: str = "e2e-host") -> str:
    return f"iscsi://{user}%{secret}@127.0.0.1:{vm.ports['iscsi']}/{IQN}/{lun}"


def libiscsi(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ) | (env or {}))


def capacity(e2e: E2E, lun: int) -> subprocess.CompletedProcess[str]:
    """READ CAPACITY(16) from the host; libiscsi's login TUR shows a LUN's sense data."""
    return libiscsi("iscsi-readcapacity16", "-i", HOST, url(e2e.vm, lun, e2e.chap["host"]))


def wait_ready(e2e: E2E, *luns: int, timeout: float = 240) -> float:
    start = time.monotonic()
    for lun in luns:
        while (got := capacity(e2e, lun)).returncode != 0:
            assert time.monotonic() - start < timeout, f"LUN {lun} not ready: {got.stderr}"
            time.sleep(1)
    return time.monotonic() - start


def wait_sense(e2e: E2E, lun: int, sense: str, timeout: float = 240) -> str:
    """Wait until LUN ``lun`` answers with ``sense`` (libiscsi's 'SENSE KEY:... (0xASCQ)')."""
    deadline = time.monotonic() + timeout
    while sense not in (got := capacity(e2e, lun)).stderr:
        assert time.monotonic() < deadline, f"LUN {lun}: no {sense}: {got.stderr}{got.stdout}"
        time.sleep(1)
    return got.stderr.strip()


def qemu_opts(e2e: E2E, lun: int) -> str:
    return (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{e2e.vm.ports['iscsi']},target={IQN},"
            f"lun={lun},user=e2e-host,password={e2e.chap['host']},initiator-name={HOST}")


def write_lun(e2e: E2E, lun: int, offset: int, data: bytes, tmp: Path) -> None:
    (tmp / "data").write_bytes(data)
    out = subprocess.run(["qemu-io", "--image-opts", qemu_opts(e2e, lun), "-c",
                          f"write -s {tmp / 'data'} {offset} {len(data)}"],
                         capture_output=True, text=True, timeout=300)
    assert f"wrote {len(data)}/{len(data)} bytes" in out.stdout, out.stdout + out.stderr


def read_lun(e2e: E2E, lun: int, offset: int, size: int, tmp: Path) -> bytes:
    """``size`` bytes at ``offset`` through QEMU's libiscsi driver; b'' when refused."""
    out = tmp / "read"
    out.unlink(missing_ok=True)
    opts = f"driver=raw,offset={offset},size={size}," + ",".join(
        f"file.{kv}" for kv in qemu_opts(e2e, lun).split(","))
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts", opts, str(out)],
                   capture_output=True, timeout=300)
    return out.read_bytes() if out.exists() else b""


def gatewayd(vm: Appliance, conf: str) -> None:
    """(Re)start gatewayd's unit with this gatewayd.conf; returns at READY=1."""
    put(vm, f"{ETC}/gatewayd.conf", conf)
    sh(vm, "systemctl restart evlu-gatewayd", timeout=400)


BASE_CONF = 'dbus = "off"\n'


def chap_toml(chap: dict[str, str]) -> str:
    return f"""
[host]
userid = "e2e-host"
password = "{chap['host']}"
mutual_userid = "e2e-gw"
mutual_password = "{chap['host_in']}"

[guest]
userid = "e2e-guest"
password = "{chap['guest']}"
mutual_userid = "e2e-gw"
mutual_password = "{chap['guest_in']}"

[discovery]
userid = "e2e-disc"
password = "{chap['discovery']}"
"""


def guest_login(e2e: E2E, iface: str, password_in: str) -> subprocess.CompletedProcess:
    """open-iscsi in the guest: a node for GUEST through ``iface``, mutual CHAP, login."""
    node = f"{NODE} -I {iface}"
    settings = {"node.session.auth.authmethod": "CHAP",
                "node.session.auth.username": "e2e-guest",
                "node.session.auth.password": e2e.chap["guest"],
                "node.session.auth.username_in": "e2e-gw",
                "node.session.auth.password_in": password_in}
    updates = "; ".join(f"{node} --op update -n {k} -v {v} >/dev/null" for k, v in settings.items())
    result = e2e.vm.agent.run(["sh", "-c", f"""
        modprobe iscsi_tcp; mkdir -p /run/lock/iscsi; systemctl start iscsid
        iscsiadm -m iface -I {iface} --op new >/dev/null
        iscsiadm -m iface -I {iface} --op update -n iface.initiatorname -v {GUEST} >/dev/null
        {node} --op new >/dev/null
        {updates}
        {node} --login 2>&1"""], timeout=180, check=False)
    return subprocess.CompletedProcess(list(result.argv), result.rc, result.text,
                                       result.stderr.decode())


def guest_logout(vm: Appliance, iface: str) -> None:
    vm.agent.run(["sh", "-c", f"{NODE} -I {iface} --logout; {NODE} -I {iface} --op delete; "
                              f"iscsiadm -m iface -I {iface} --op delete"], check=False)


def guest_disk(vm: Appliance, lun: int) -> str:
    link = f"/dev/disk/by-path/ip-{PORTAL}-iscsi-{IQN}-lun-{lun}"
    return vm.agent.run(["sh", "-c", f"udevadm settle; readlink -e {link}"]).text.strip()


def vm_python(vm: Appliance, script: str, stdin: bytes = b"") -> str:
    """A Python script run in the guest with ``stdin``; its output."""
    put(vm, f"{DIR}/step.py", script)
    return vm.agent.run(["sh", "-c", ENV + f"python3 {DIR}/step.py"], stdin=stdin,
                        timeout=300).text


@pytest.fixture(scope="module")
def e2e(appliance: Appliance, guest_kms: str) -> Iterator[E2E]:
    vm = appliance
    start = time.monotonic()
    setup = E2E(vm, {name: secrets.token_hex(10) for name in
                     ("host", "host_in", "guest", "guest_in", "discovery")},
                os.urandom(DATASET))
    vm.agent.run(["sh", "-c", f"mkdir -p {DIR} && cat > {DIR}/e2e.py && "
                              f"truncate -s 64M {DIR}/a.img"], stdin=GUEST_SCRIPT.read_bytes())
    put(vm, f"{ETC}/chap.toml", chap_toml(setup.chap), "600")
    put(vm, f"{ETC}/lio.toml", LIO_TOML)
    formatted, enrolled = evlu(vm, ["format", f"{DIR}/a.img", "--kms", "-q", "--yes"],
                               ["kms", "enroll", "gw2"])
    assert formatted["rc"] == 0 and enrolled["rc"] == 0, (formatted, enrolled)
    setup.uuid = next(line.split()[-1] for line in formatted["stdout"].splitlines()
                      if "UUID:" in line)
    setup.luns[f"{DIR}/a.img"] = 0
    try:
        gatewayd(vm, BASE_CONF)
        login = guest_login(setup, "e2e", setup.chap["guest_in"])
        assert login.returncode == 0, login.stdout + login.stderr
        setup.guest_disk = guest_disk(vm, 0)
        wait_ready(setup, 0)
        REPORT.append(f"e2e setup (format --kms, lio.toml + chap.toml, gatewayd unit, guest "
                      f"login, key looked up): {time.monotonic() - start:.0f} s")
        yield setup
    finally:
        guest_logout(vm, "e2e")
        put(vm, f"{ETC}/lio.toml", "")
        sh(vm, f"""
            touch /run/e2e-stop; systemctl stop e2e-writer 2>/dev/null || true
            python3 -c "from gateway.daemon.client import call; call('apply', {{}})" \
                || evlu lio apply || true
            systemctl stop evlu-gatewayd; systemctl reset-failed evlu-gatewayd || true
            rm -f {ETC}/gatewayd.conf {ETC}/lio.toml {ETC}/chap.toml {ETC}/lio-owned.json
            vgremove -q -f e2evg 2>/dev/null || true
            for l in $(losetup -j {DIR}/pv.img -O NAME -n); do losetup -d $l; done
            systemctl disable -q evlu-e2e-pv 2>/dev/null || true
            rm -f /etc/systemd/system/evlu-e2e-pv.service; systemctl daemon-reload
            systemctl enable -q --now evlu-kms
            rm -rf {DIR} /run/e2e-stop""", timeout=600, check=False)


def test_a_encrypted_lun_from_config_holds_only_ciphertext(e2e: E2E, tmp_path: Path) -> None:
    """a: an eVLU from lio.toml (CHAP), `evlu format --kms`, gatewayd's unit: the
    initiator's dataset reads back, and no 64-byte piece of it is in the backing file."""
    start = time.monotonic()
    write_lun(e2e, 0, 0, e2e.dataset, tmp_path)
    assert read_lun(e2e, 0, 0, DATASET, tmp_path) == e2e.dataset
    # Every 64-byte-aligned window of the file against every 64-byte piece of the dataset
    # (the data segment is sector-aligned, so leaked plaintext would sit in such windows).
    scan = f"""
import sys, numpy as np
pieces = np.frombuffer(sys.stdin.buffer.read(), dtype=np.uint8).reshape(-1, 64)
raw = np.fromfile("{DIR}/a.img", dtype=np.uint8).reshape(-1, 64)
first = lambda rows: np.ascontiguousarray(rows[:, :8]).view("<u8").ravel()
candidates = np.nonzero(np.isin(first(raw), first(pieces)))[0]
known = {{bytes(p) for p in pieces}}
print(sum(bytes(raw[i]) in known for i in candidates), len(raw), int(raw[{16 * MIB // 64}:].any()))
"""
    found, windows, ciphertext = vm_python(e2e.vm, scan, e2e.dataset).split()
    assert (found, ciphertext) == ("0", "1"), "plaintext in the backing file"
    REPORT.append(f"e2e a: 4 MiB dataset written and read back over CHAP; 0 of its 65536 "
                  f"pieces in the file's {windows} windows; {time.monotonic() - start:.0f} s")


def test_b_replicas_come_up_with_no_key_step(e2e: E2E, tmp_path: Path) -> None:
    """b: a dd copy, a copy onto a larger LV and an LVM snapshot of it, exported with
    `evlu lun add PATH --target IQN`: identical data, and only key lookups in the audit log."""
    start = time.monotonic()
    vm = e2e.vm
    mark = len(audit(vm))
    put(vm, "/etc/systemd/system/evlu-e2e-pv.service", PV_UNIT)
    sh(vm, f"""
        dd if={DIR}/a.img of={DIR}/copy.img bs=1M conv=sparse status=none
        truncate -s 100M {DIR}/pv.img
        systemctl daemon-reload; systemctl enable -q --now evlu-e2e-pv
        pvcreate -q $(losetup -j {DIR}/pv.img -O NAME -n)
        vgcreate -q e2evg $(losetup -j {DIR}/pv.img -O NAME -n)
        lvcreate -q -y -L 72M -n rep e2evg
        dd if={DIR}/a.img of=/dev/e2evg/rep bs=1M oflag=direct status=none
        lvcreate -q -y -s -L 12M -n snap e2evg/rep""")
    copies = [f"{DIR}/copy.img", "/dev/e2evg/rep", "/dev/e2evg/snap"]
    added = evlu(vm, *(["lun", "add", path, "--target", IQN, "--json"] for path in copies))
    for result in added:
        assert result["rc"] == 0, result
        info = json.loads(result["stdout"])
        assert info["state"] == "ENCRYPTED" and info["exported"] and info["uuid"] == e2e.uuid
    config = tomllib.loads(sh(vm, f"cat {ETC}/lio.toml"))
    e2e.luns = {x["path"]: x["lun"] for x in config["targets"][0]["tpgs"][0]["luns"]}
    assert set(copies) <= set(e2e.luns), e2e.luns  # the paths as given, not /dev/dm-N
    for path in copies:
        assert read_lun(e2e, e2e.luns[path], 0, DATASET, tmp_path) == e2e.dataset, path
    events = audit(vm, mark)
    assert events and all(e["event"] == "lookup" and e["outcome"] == "granted" for e in events), \
        events
    assert {e["volume"] for e in events} == {e2e.uuid}
    larger = capacity(e2e, e2e.luns["/dev/e2evg/rep"]).stdout
    REPORT.append(f"e2e b: dd copy, larger LV ({larger.strip().splitlines()[-1]}), LVM snapshot: "
                  f"identical dataset; audit: {len(events)} lookups, nothing else; "
                  f"{time.monotonic() - start:.0f} s")


def rogue_identity(vm: Appliance) -> None:
    """An identity 'appliance' from another CA (made like tests/test_kms*.py's), with the
    real KMS profile: a gateway this KMS never enrolled."""
    ca = pki.make_ca("rogue CA")
    pair = pki.issue(ca, "appliance")
    key = pair.key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    sh(vm, f"mkdir -p {ROGUE}/gateways/appliance && cp -a {ETC}/profiles {ROGUE}/")
    put(vm, f"{ROGUE}/gateway.json", json.dumps({"default_profile": "embedded",
                                                 "gateway": "appliance", "key_cache": {}}))
    put(vm, f"{ROGUE}/gateways/appliance/cert.pem",
        pair.cert.public_bytes(serialization.Encoding.PEM))
    put(vm, f"{ROGUE}/gateways/appliance/key.pem", key, "600")


def test_c_second_identity_serves_and_an_unenrolled_one_gets_data_protect(
        e2e: E2E, tmp_path: Path) -> None:
    """c: gatewayd as an unenrolled gateway (another CA): DATA PROTECT 74/71 and zero
    plaintext bytes; then as a second enrolled identity (gw2): the replica reads identical."""
    start = time.monotonic()
    vm, copy = e2e.vm, e2e.luns[f"{DIR}/copy.img"]
    rogue_identity(vm)
    gatewayd(vm, BASE_CONF + f'config-dir = "{ROGUE}"\nlio = false\n')
    refused = wait_sense(e2e, copy, "SENSE KEY:DATA PROTECTION(7) ASCQ:(null)(0x7471)")
    wait_sense(e2e, 0, "(0x7471)")
    for _ in range(5):  # unit attentions first (b's new LUNs: REPORTED LUNS DATA HAS CHANGED)
        tur = vm.agent.run(["sg_turs", "-v", e2e.guest_disk], check=False)
        said = (tur.text + tur.stderr.decode()).lower()
        if "unit attention" not in said:
            break
    assert tur.rc != 0 and "data protect" in said and "access not authorized" in said, said
    read = vm.agent.run(["dd", f"if={e2e.guest_disk}", "of=/dev/stdout", "bs=4096", "count=16",
                         "iflag=direct", "status=none"], check=False, timeout=180)
    assert read.rc != 0 and read.stdout == b""
    assert read_lun(e2e, copy, 0, DATASET, tmp_path) == b""
    assert read_lun(e2e, 0, 0, DATASET, tmp_path) == b""
    rogue = [json.loads(line) for line in sh(vm, f"cat {ROGUE}/audit.log").splitlines()]
    assert rogue and all(e["outcome"] == "refused" for e in rogue if e["event"] == "lookup")
    rogue_seconds = time.monotonic() - start

    mark = len(audit(vm))
    gatewayd(vm, BASE_CONF + 'gateway = "gw2"\n')
    wait_ready(e2e, copy)
    assert read_lun(e2e, copy, 0, DATASET, tmp_path) == e2e.dataset
    granted = [e for e in audit(vm, mark) if e["event"] == "lookup" and e["outcome"] == "granted"]
    assert granted and {e["gateway"] for e in granted} == {"gw2"}
    REPORT.append(f"e2e c: unenrolled gateway: {refused.split('. ', 1)[-1]}, 0 bytes through "
                  f"open-iscsi and QEMU ({rogue_seconds:.0f} s); gw2 serves the replica "
                  f"identical; {time.monotonic() - start:.0f} s")


def test_e_zeroed_primary_header_is_served_from_the_secondary_and_repaired(
        e2e: E2E, tmp_path: Path) -> None:
    """e: 4096 zero bytes over the primary header of a running LUN; a rescan (or gatewayd's
    header watcher, if it gets there first) serves it from the secondary copy and rewrites
    the primary, and the journal says so; the data reads identical."""
    start = time.monotonic()
    vm, path = e2e.vm, f"{DIR}/a.img"
    since = sh(vm, "date +%s.%N").strip()
    sh(vm, f"dd if=/dev/zero of={path} bs=4096 count=1 conv=notrunc status=none")
    [rescanned] = control(vm, "rescan", lun=path)
    assert (rescanned["state"], rescanned["transition"]) == ("ENCRYPTED", None), rescanned
    assert vm.agent.run(["head", "-c", "6", path]).stdout == b"LUKS\xba\xbe"
    journal = sh(vm, f"journalctl -u evlu-gatewayd --since @{since} -o cat")
    assert f"{path}: header copy rewritten from the secondary copy" in journal, journal
    dump = sh(vm, f"cryptsetup luksDump {path}")
    assert "evlu-kmip" in dump and e2e.uuid in dump
    assert read_lun(e2e, 0, 0, DATASET, tmp_path) == e2e.dataset
    REPORT.append(f"e2e e: primary header zeroed under the running LUN: rescan kept it "
                  f"ENCRYPTED and rewrote the primary (cryptsetup luksDump reads it), dataset "
                  f"identical; {time.monotonic() - start:.0f} s")


def test_f_chap_one_way_mutual_and_discovery(e2e: E2E) -> None:
    """f: a wrong secret is refused, the right one logs in; a target that does not know the
    mutual secret is refused by the initiator (libiscsi and open-iscsi); SendTargets needs
    the discovery credentials."""
    start = time.monotonic()
    vm, secret = e2e.vm, e2e.chap["host"]
    mutual = {"LIBISCSI_CHAP_TARGET_USERNAME": "e2e-gw",
              "LIBISCSI_CHAP_TARGET_PASSWORD": e2e.chap["host_in"]}
    assert libiscsi("iscsi-inq", "-i", HOST, url(vm, 0, secret), env=mutual).returncode == 0
    wrong = libiscsi("iscsi-inq", "-i", HOST, url(vm, 0, "WrongSecret-0123"))
    assert wrong.returncode != 0 and "Authentication failure" in wrong.stderr, wrong.stderr
    none = libiscsi("iscsi-inq", "-i", HOST, f"iscsi://127.0.0.1:{vm.ports['iscsi']}/{IQN}/0")
    assert none.returncode != 0
    impostor = libiscsi("iscsi-inq", "-i", HOST, url(vm, 0, secret),
                        env=mutual | {"LIBISCSI_CHAP_TARGET_PASSWORD": "NotTheTarget-0123"})
    assert impostor.returncode != 0 and "Invalid CHAP_R" in impostor.stderr, impostor.stderr
    bad = guest_login(e2e, "e2ebad", "NotTheTarget-0123")
    guest_logout(vm, "e2ebad")
    assert bad.returncode != 0, bad.stdout  # open-iscsi refuses the target's CHAP_R
    portal = f"127.0.0.1:{vm.ports['iscsi']}"
    listed = libiscsi("iscsi-ls", "-i", HOST, f"iscsi://e2e-disc%{e2e.chap['discovery']}@{portal}")
    assert f"Target:{IQN}" in listed.stdout, listed.stderr
    for anonymous in (f"iscsi://{portal}", f"iscsi://e2e-disc%WrongSecret-0123@{portal}"):
        assert IQN not in libiscsi("iscsi-ls", "-i", HOST, anonymous).stdout
    REPORT.append(f"e2e f: CHAP wrong/none refused, right accepted; mutual verified by "
                  f"libiscsi and open-iscsi (wrong target secret refused); discovery needs its "
                  f"credentials; {time.monotonic() - start:.0f} s")


def writer_count(vm: Appliance) -> int:
    return int(vm.agent.run(["sh", "-c", f"cat {DIR}/writer.log 2>/dev/null | grep -cv '^E' "
                                         "|| true"]).text)


def unit(vm: Appliance, name: str) -> dict[str, str]:
    out = vm.agent.run(["systemctl", "show", name, "-p", "ActiveState,MainPID,NRestarts"]).text
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_h_sigkill_during_writes_loses_no_acknowledged_write(e2e: E2E) -> None:
    """h: gatewayd SIGKILLed under a guest writer (O_DIRECT|O_DSYNC, numbered 4 KiB blocks,
    each acknowledged one logged): systemd restarts it, the writer goes on, and every
    acknowledged block reads back intact."""
    start = time.monotonic()
    vm = e2e.vm
    offset, count = WRITER
    e2e.writer_log = f"{DIR}/writer.log"
    sh(vm, f"rm -f /run/e2e-stop {e2e.writer_log}; systemd-run -q --unit=e2e-writer "
           f"-p EnvironmentFile=/etc/default/evlu-gateway /opt/evlu-gateway/venv/bin/python3 "
           f"{DIR}/e2e.py writer {e2e.guest_disk} {offset} {count} {e2e.writer_log} "
           "/run/e2e-stop")
    deadline = time.monotonic() + 120
    while writer_count(vm) < 30:
        assert time.monotonic() < deadline, "the writer does not get going"
        time.sleep(1)
    before = unit(vm, "evlu-gatewayd")
    sh(vm, "systemctl kill -s SIGKILL evlu-gatewayd")
    killed = time.monotonic()
    at_kill = writer_count(vm)
    deadline = time.monotonic() + 240
    while True:
        now = unit(vm, "evlu-gatewayd")
        restarted = now["ActiveState"] == "active" and now["MainPID"] != before["MainPID"]
        if restarted and writer_count(vm) >= at_kill + 100:
            break
        assert time.monotonic() < deadline, f"no recovery: {now}, {writer_count(vm)} acked"
        time.sleep(1)
    recovered = time.monotonic() - killed
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    sh(vm, "touch /run/e2e-stop; while systemctl -q is-active e2e-writer; do sleep 0.5; done")
    result = json.loads(vm.agent.run(["sh", "-c", ENV + f"python3 {DIR}/e2e.py verify "
                                      f"{e2e.guest_disk} {offset} {e2e.writer_log}"],
                                     timeout=300).stdout)
    assert result["bad"] == [], result
    assert result["acked"] > at_kill + 100
    lines = sh(vm, f"cat {e2e.writer_log}").splitlines()
    times = [float(line.split()[1]) for line in lines if not line.startswith("E")]
    stall = max(b - a for a, b in zip(times, times[1:]))
    REPORT.append(f"e2e h: SIGKILL after {at_kill} acknowledged writes; restarted by systemd, "
                  f"writes resumed (longest stall {stall:.1f} s, {len(result['failed'])} "
                  f"failed with an I/O error, not acknowledged); all {result['acked']} "
                  f"acknowledged blocks intact; recovered in {recovered:.0f} s; "
                  f"{time.monotonic() - start:.0f} s")


def test_d_g_reboot_with_the_kms_down_then_up(e2e: E2E, tmp_path: Path) -> None:
    """d + g: the appliance reboots while the KMS is down: LIO (target, ACLs, LUNs) is back
    with no admin action and the LUNs answer NOT READY 04/01; the KMS starts: they turn
    READY without restarting anything, the keys looked up again, and no write is lost."""
    start = time.monotonic()
    vm = e2e.vm
    guest_logout(vm, "e2e")  # the guest's own session would outlive its target at shutdown
    sh(vm, "systemctl disable -q --now evlu-kms")
    mark = len(audit(vm))
    vm.reboot()
    booted = time.monotonic() - start
    lio = json.loads(vm_python(vm, LIO_DUMP))
    assert lio == {"enable": True, "acls": sorted([HOST, GUEST]),
                   "luns": sorted(e2e.luns.values())}, lio
    first = unit(vm, "evlu-gatewayd")
    assert first["ActiveState"] == "active"
    for lun in e2e.luns.values():
        wait_sense(e2e, lun, "SENSE KEY:NOT READY(2) ASCQ:(null)(0x0401)", timeout=120)
    kms_up = time.monotonic()
    sh(vm, "systemctl enable -q --now evlu-kms")
    ready = wait_ready(e2e, *e2e.luns.values())
    after = unit(vm, "evlu-gatewayd")
    assert (after["MainPID"], after["NRestarts"]) == (first["MainPID"], first["NRestarts"])
    for path, lun in e2e.luns.items():
        assert read_lun(e2e, lun, 0, DATASET, tmp_path) == e2e.dataset, path
    acked, _ = acknowledged(sh(vm, f"cat {e2e.writer_log}").splitlines())
    offset, _ = WRITER
    region = read_lun(e2e, 0, offset, (max(acked) + 1) * BLOCK, tmp_path)
    assert damaged(region, acked) == []
    events = audit(vm, mark)
    assert {e["event"] for e in events} == {"lookup"}, events
    granted = {e["volume"] for e in events if e["outcome"] == "granted"}
    assert granted == {e2e.uuid}
    REPORT.append(f"e2e d+g: rebooted with the KMS down in {booted:.0f} s: target, 2 ACLs, "
                  f"{len(e2e.luns)} LUNs back, all NOT READY 04/01; KMS started: all READY "
                  f"{ready:.0f} s later ({time.monotonic() - kms_up:.0f} s with reads), gatewayd "
                  f"not restarted; dataset and {len(acked)} acknowledged blocks intact; audit: "
                  f"{len(events)} lookups; {time.monotonic() - start:.0f} s")
