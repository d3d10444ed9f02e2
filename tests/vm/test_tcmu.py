"""The user:evlu TCMU handler on the real kernel, reached by real initiators.

In the appliance: the embedded KMS (``evlu kms init/enroll``, its systemd
unit), eVLUs formatted through it, ``evlu tcmu serve`` as a transient systemd
unit, and ``user:evlu`` backstores behind an iSCSI target made with rtslib-fb.
From the host, through the forwarded port: libiscsi and QEMU's libiscsi
driver.  In the guest: dm-crypt (``cryptsetup open``) over the same backing
file, and open-iscsi + sg3_utils for sense data.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPORT

from appliance.vm import Appliance

from . import iscsi_test_cu
from .test_smoke import BASELINE, host

pytestmark = pytest.mark.vm

MIB = 1 << 20
GUEST_SCRIPT = Path(__file__).resolve().parent / "guest" / "evlu_target.py"
ENV = "set -e; . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "
LUNDIR = "/var/lib/evlu"
NOT_READY = "SENSE KEY:NOT READY(2) ASCQ:(null)(0x0401)"  # libiscsi's words for 04/01


def sh(vm: Appliance, script: str, timeout: float = 180) -> str:
    return vm.agent.run(ENV + script, timeout=timeout).text


def url(vm: Appliance, iqn: str, lun: int) -> str:
    return f"iscsi://127.0.0.1:{vm.ports['iscsi']}/{iqn}/{lun}"


def opts(vm: Appliance, iqn: str, lun: int, offset: int, size: int) -> str:
    return (f"driver=raw,offset={offset},size={size},file.driver=iscsi,file.transport=tcp,"
            f"file.portal=127.0.0.1:{vm.ports['iscsi']},file.target={iqn},file.lun={lun}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def served(appliance: Appliance, guest_kms: str) -> Iterator[dict]:
    """KMS up, four eVLUs (ok, shredded key, waiting for the KMS, and one of 4096-byte
    sectors served as a 4Kn LUN), the handler serving them.

    The handler runs commands on its ring thread (``--workers 0``, as bench/ does): under
    TCG a hand-off to a worker thread made iscsi-test-cu's reads take 1.7 times as long.
    gatewayd's worker pool meets the real kernel in test_e2e and test_gatewayd."""
    start = time.monotonic()
    sh(appliance, f"""
        for n in 0 1 2 4k; do truncate -s 64M {LUNDIR}/lun$n.img; done
        for n in 0 1 2; do evlu format {LUNDIR}/lun$n.img --kms -q --yes --no-wipe >/dev/null; done
        evlu format {LUNDIR}/lun4k.img --kms -q --yes --no-wipe --sector-size 4096 >/dev/null
        evlu shred {LUNDIR}/lun1.img --yes >/dev/null
        systemd-run --unit=evlu-tcmu-test -p EnvironmentFile=/etc/default/evlu-gateway \\
            /opt/evlu-gateway/venv/bin/evlu tcmu serve --dbus off --workers 0
        for i in $(seq 120); do
            journalctl -u evlu-tcmu-test | grep -q "serving user:evlu" && break; sleep 1
        done
    """, timeout=400)
    summary = json.loads(appliance.agent.run(
        ["python3", "-", "create", f"lun0={LUNDIR}/lun0.img", f"lun1={LUNDIR}/lun1.img",
         f"lun4k={LUNDIR}/lun4k.img"],
        stdin=GUEST_SCRIPT.read_bytes(), timeout=180).stdout)
    # The handler looks the key up when the device appears: NOT READY until then.
    lun0 = url(appliance, summary["iqn"], summary["luns"]["lun0"]["lun"])
    deadline = time.monotonic() + 120
    while subprocess.run(["iscsi-inq", lun0], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "lun0 never became ready"
        time.sleep(2)
    REPORT.append(f"user:evlu LUNs served in the appliance {time.monotonic() - start:.0f} s "
                  f"after setup began (KMS, 4 formats, shred, handler, rtslib)")
    yield summary
    appliance.agent.run(["systemctl", "stop", "evlu-tcmu-test"], check=False)


def test_inquiry_and_capacity_are_the_evlus(appliance: Appliance, served: dict) -> None:
    lun0 = served["luns"]["lun0"]
    inquiry = host("iscsi-inq", url(appliance, served["iqn"], lun0["lun"]))
    assert "Vendor:EVLU" in inquiry and "Peripheral Device Type:DIRECT_ACCESS" in inquiry
    capacity = host("iscsi-readcapacity16", url(appliance, served["iqn"], lun0["lun"]))
    assert f"Total size:{lun0['size']}" in capacity  # the data segment, not the file
    assert lun0["size"] == 64 * MIB - 16 * MIB


@pytest.mark.parametrize("name", ["lun0", "lun4k"])
def test_data_round_trips_and_dm_crypt_reads_the_same(appliance: Appliance, served: dict,
                                                      tmp_path: Path, name: str) -> None:
    """Mixed sizes and alignments (QEMU reads and rewrites the blocks around unaligned
    pieces of the 4Kn LUN), then dm-crypt over the backing file, with its own sector size."""
    iqn, lun = served["iqn"], served["luns"][name]
    block = lun["block_size"]
    assert block == (4096 if name == "lun4k" else 512)
    pieces = [(0, 4096), (MIB + 512, 65536 + 1024), (5 * MIB, MIB), (40 * MIB - 512, 8192)]
    written = {}
    for offset, size in pieces:
        data = os.urandom(size)
        (tmp_path / "piece").write_bytes(data)
        host("qemu-io", "-f", "raw", "-c", f"write -s {tmp_path / 'piece'} {offset} {size}",
             url(appliance, iqn, lun["lun"]))
        written[offset] = data
    for offset, data in written.items():
        out = tmp_path / f"back{offset}"
        host("qemu-img", "convert", "-O", "raw", "--image-opts",
             opts(appliance, iqn, lun["lun"], offset, len(data)), str(out))
        assert sha(out.read_bytes()) == sha(data), f"read back at {offset}"
    # The backing file holds none of it in clear.
    needles = ",".join(f"'{data[:64].hex()}'" for data in written.values())
    found = sh(appliance, f"""python3 -c "
raw = open('{lun['path']}', 'rb').read()
print(sum(raw.count(bytes.fromhex(h)) for h in [{needles}]))" """)
    assert found.strip() == "0"
    # dm-crypt opens the same file with the KEK and shows exactly what the initiator wrote.
    sh(appliance, f"""python3 -c "
from gateway.kms import Config
from gateway.kms.kmip_client import KmipKeyManager
from gateway import format as fmt
from gateway.backstore import open_backstore
dev = open_backstore('{lun['path']}', readonly=True)
token = fmt.read(dev).header.metadata.evlu_tokens()[0]
c = Config()
kek = KmipKeyManager(c.profile(), c.identity()).fetch(token.key_id)
import os
fd = os.open('/run/evlu-test.kek', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, bytes(kek)); os.close(fd)"
        cryptsetup open --type luks2 --readonly --key-file /run/evlu-test.kek {lun['path']} evlu-test
        rm -f /run/evlu-test.kek""")
    try:
        logical = sh(appliance, "blockdev --getss /dev/mapper/evlu-test").strip()
        assert logical == str(block)
        for offset, data in written.items():
            first, end = offset // block, -(-(offset + len(data)) // block)
            got = appliance.agent.run(["dd", "if=/dev/mapper/evlu-test", f"bs={block}",
                                       f"skip={first}", f"count={end - first}",
                                       "iflag=direct", "status=none"]).stdout
            got = got[offset - first * block:][:len(data)]
            assert sha(got) == sha(data), f"dm-crypt sees other data at {offset}"
    finally:
        appliance.agent.run(["cryptsetup", "close", "evlu-test"], check=False)


@pytest.fixture(scope="module")
def guest_scsi(appliance: Appliance, served: dict) -> Iterator[dict[int, str]]:
    """The target's LUNs as /dev/sgN in the guest (open-iscsi over loopback)."""
    portal = "127.0.0.1:3260"
    node = ["iscsiadm", "-m", "node", "-T", served["iqn"], "-p", portal]
    sh(appliance, "modprobe iscsi_tcp sg; mkdir -p /run/lock/iscsi; systemctl start iscsid")
    appliance.agent.run(["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal])
    appliance.agent.run(node + ["--login"])
    try:
        appliance.agent.run(["udevadm", "settle"])
        devices = {}
        for info in served["luns"].values():
            link = f"/dev/disk/by-path/ip-{portal}-iscsi-{served['iqn']}-lun-{info['lun']}"
            disk = appliance.agent.run(["readlink", "-e", link]).text.strip()
            devices[info["lun"]] = disk
        yield devices
    finally:
        appliance.agent.run(node + ["--logout"], check=False)


def test_refused_key_is_data_protect_and_writes_nothing(appliance: Appliance, served: dict,
                                                        guest_scsi: dict[int, str]) -> None:
    lun1 = served["luns"]["lun1"]
    disk = guest_scsi[lun1["lun"]]
    before = sh(appliance, f"sha256sum {lun1['path']}")
    tur = appliance.agent.run(["sg_turs", "-v", disk], check=False)
    assert tur.rc != 0 and "data protect" in (tur.text + tur.stderr.decode()).lower()
    write = appliance.agent.run(["dd", "if=/dev/zero", f"of={disk}", "bs=4096", "count=1",
                                 "oflag=direct"], check=False)
    assert write.rc != 0
    assert sh(appliance, f"sha256sum {lun1['path']}") == before


def test_waiting_for_the_kms_is_not_ready_then_ready(appliance: Appliance, served: dict) -> None:
    """A LUN whose key cannot be looked up (KMS down) answers NOT READY 04/01, and is ready
    on its own once the KMS is back. From the host's libiscsi: a guest initiator would
    spend ~100 s in the kernel's spin-up wait on the not-ready disk."""
    sh(appliance, "systemctl stop evlu-kms")
    try:
        summary = json.loads(appliance.agent.run(
            ["python3", "-", "create", f"lun2={LUNDIR}/lun2.img"],
            stdin=GUEST_SCRIPT.read_bytes(), timeout=180).stdout)
        lun2 = url(appliance, served["iqn"], summary["luns"]["lun2"]["lun"])
        got = subprocess.run(["iscsi-readcapacity16", lun2], capture_output=True, text=True)
        assert got.returncode != 0 and NOT_READY in got.stderr, got.stdout + got.stderr
    finally:
        sh(appliance, "systemctl start evlu-kms")
    deadline = time.monotonic() + 90
    while (got := subprocess.run(["iscsi-readcapacity16", lun2], capture_output=True,
                                 text=True)).returncode != 0:
        assert time.monotonic() < deadline and NOT_READY in got.stderr, got.stdout + got.stderr
        time.sleep(1)
    assert f"Total size:{64 * MIB - 16 * MIB}" in got.stdout


def test_iscsi_test_cu_at_least_what_fileio_passes(appliance: Appliance, served: dict,
                                                   tmp_path: Path) -> None:
    lun0 = served["luns"]["lun0"]
    results = iscsi_test_cu.run(url(appliance, served["iqn"], lun0["lun"]), tmp_path)
    baseline = json.loads(BASELINE.read_text())["suites"]
    table = ["| suite | fileio pass/fail | user:evlu pass/fail |", "|---|---|---|"]
    worse = {}
    for name in iscsi_test_cu.SUITES:
        ours, base = results[name], baseline[name]
        table.append(f"| {name} | {base['pass']}/{base['fail']} | "
                     f"{len(ours.passed)}/{len(ours.failed)} |")
        missing = sorted(set(ours.failed) - set(base["failed"]))
        if missing:
            worse[name] = missing
    REPORT.append("iscsi-test-cu, user:evlu vs LIO fileio:\n" + "\n".join(table))
    assert not worse, f"user:evlu fails tests LIO fileio passes: {worse}"
    # LIO fileio lacks GET LBA STATUS, so its GetLBAStatus tests pass as skipped; ours ran
    log = (tmp_path / "iscsi-test-cu.log").read_text()
    assert "GETLBASTATUS is not implemented" not in log and \
        "GET_LBA_STATUS is not implemented" not in log


def test_resize_reaches_the_initiator(appliance: Appliance, served: dict,
                                      guest_scsi: dict[int, str]) -> None:
    """Grow the backing file, then LIO's dev_size: the RECONFIG event carries the size."""
    lun0 = served["luns"]["lun0"]
    disk, new_size = guest_scsi[lun0["lun"]], lun0["size"] + 16 * MIB
    for _ in range(5):  # unit attentions still queued for the guest (LIO's 3F/0E for lun2)
        if appliance.agent.run(["sg_turs", disk], check=False).rc == 0:
            break
    # udev answers a 3F/0E with commands of its own: let them finish before the resize
    seen = int(sh(appliance, "udevadm settle; dmesg | grep -c 'Capacity data has changed' || true"))
    sh(appliance, f"""
        truncate -s {new_size + 16 * MIB} {lun0['path']}
        echo {new_size} > $(ls -d /sys/kernel/config/target/core/user_*/lun0)/attrib/dev_size
        # without netlink replies the write returns before the handler has seen the event
        for i in $(seq 60); do
            journalctl -u evlu-tcmu-test | grep -q "reconfigured: dev_size {new_size}" && break
            sleep 0.5
        done""")
    # The unit attention 2A/09 goes to the first command after the resize: this TUR, or
    # one the guest's kernel sent meanwhile.  Either way the guest's SCSI layer logs it.
    appliance.agent.run(["sg_turs", disk], check=False)
    told = int(sh(appliance, "dmesg | grep -c 'Capacity data has changed' || true"))
    assert told == seen + 1, f"the guest saw 2A/09 {told - seen} times after the resize"
    assert f"Device size: {new_size} bytes" in sh(appliance, f"sg_readcap -l {disk}")
    assert f"Total size:{new_size}" in host("iscsi-readcapacity16",
                                            url(appliance, served["iqn"], lun0["lun"]))
    # The guest's disk grows on a rescan; blocks past the old end take data and return it.
    out = sh(appliance, f"""
        echo 1 > /sys/block/$(basename {disk})/device/rescan
        blockdev --getsize64 {disk}
        head -c {MIB} /dev/urandom > /run/evlu-piece
        dd if=/run/evlu-piece of={disk} bs={MIB} seek={new_size // MIB - 1} oflag=direct status=none
        dd if={disk} bs={MIB} skip={new_size // MIB - 1} count=1 iflag=direct status=none \\
            | cmp - /run/evlu-piece && echo same""")
    assert out.split() == [str(new_size), "same"]
    assert f"reconfigured: dev_size {new_size}" in sh(appliance, "journalctl -u evlu-tcmu-test")
