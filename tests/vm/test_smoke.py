"""Smoke test of the appliance: a kernel LIO fileio LUN reached by real initiators.

From the host, through the forwarded port: libiscsi's iscsi-inq and
iscsi-readcapacity16, QEMU's libiscsi block driver (qemu-io, qemu-img) for
data, and iscsi-test-cu against a committed baseline. In the guest: open-iscsi
over loopback, the LUN as /dev/sdX.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPORT

from appliance.demo import create_demo_target, lun_url
from appliance.vm import Appliance

from . import iscsi_test_cu

pytestmark = pytest.mark.vm

MIB = 1 << 20
LUN_SIZE = 64 * MIB
GUEST_PORTAL = "127.0.0.1:3260"  # the guest's own view of the target
BASELINE = (Path(__file__).resolve().parents[2] / "bench" / "baselines"
            / "iscsi-test-cu-lio-fileio.json")


@pytest.fixture(scope="module")
def target(appliance: Appliance) -> dict:
    """A demo-mode iSCSI target with a 64 MiB fileio LUN 0, made with rtslib in the guest."""
    summary = create_demo_target(appliance, size=LUN_SIZE)
    REPORT.append(f"LIO target and fileio LUN created with rtslib in {summary['seconds']} s")
    return summary


@pytest.fixture
def guest_disk(appliance: Appliance, target: dict) -> Iterator[str]:
    """The LUN as a SCSI disk in the guest, logged in with open-iscsi over loopback."""
    run = appliance.agent.run
    run("modprobe iscsi_tcp && mkdir -p /run/lock/iscsi && systemctl start iscsid")
    run(["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", GUEST_PORTAL])
    node = ["iscsiadm", "-m", "node", "-T", target["iqn"], "-p", GUEST_PORTAL]
    run(node + ["--login"])
    try:
        run(["udevadm", "settle"])
        link = f"/dev/disk/by-path/ip-{GUEST_PORTAL}-iscsi-{target['iqn']}-lun-0"
        disk = run(["readlink", "-e", link]).text.strip()
        assert disk.startswith("/dev/sd"), disk
        size = int(run(["blockdev", "--getsize64", disk]).text)
        assert size == LUN_SIZE
        yield disk
    finally:
        run(node + ["--logout"], check=False)


def host(*argv: str, timeout: float = 120) -> str:
    """Run a host command; its stdout. Fails the test with its output on error."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def lun_range_opts(vm: Appliance, iqn: str, offset: int, size: int) -> str:
    """QEMU --image-opts for a byte range of the LUN through the forwarded port."""
    return (f"driver=raw,offset={offset},size={size},file.driver=iscsi,file.transport=tcp,"
            f"file.portal=127.0.0.1:{vm.ports['iscsi']},file.target={iqn},file.lun=0")


def test_guest_runs_lio_and_this_tree(appliance: Appliance) -> None:
    run = appliance.agent.run
    modules = {line.split()[0] for line in run(["cat", "/proc/modules"]).text.splitlines()}
    for module in ("target_core_mod", "target_core_user", "target_core_file",
                   "target_core_iblock", "iscsi_target_mod"):
        assert module in modules
    assert run(["findmnt", "-no", "FSTYPE", "/sys/kernel/config"]).text.strip() == "configfs"
    where = run(["python3", "-c", "import gateway; print(gateway.__file__)"]).text.strip()
    assert where == "/opt/evlu-gateway/src/gateway/__init__.py"  # dev mode: 9p first
    run(["python", "-c", "import rtslib_fb, numpy, cryptography, kmip, gateway.format"])
    assert "evlu" in run(["evlu", "--help"]).text


def test_host_initiator_sees_the_lun(appliance: Appliance, target: dict) -> None:
    url = lun_url(appliance, target["iqn"])
    inquiry = host("iscsi-inq", url)
    assert "Peripheral Device Type:DIRECT_ACCESS" in inquiry
    assert "Vendor:LIO-ORG" in inquiry
    capacity = host("iscsi-readcapacity16", url)
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in capacity
    assert f"RETURNED LOGICAL BLOCK ADDRESS:{LUN_SIZE // 512 - 1}" in capacity
    assert f"Total size:{LUN_SIZE}" in capacity


def test_data_crosses_initiators(appliance: Appliance, target: dict, guest_disk: str,
                                 tmp_path: Path) -> None:
    """Host writes (libiscsi), guest reads /dev/sdX (open-iscsi) and the backing file;
    guest writes /dev/sdX, host reads it back."""
    run = appliance.agent.run
    to_guest, to_host = os.urandom(MIB), os.urandom(MIB)
    (tmp_path / "to_guest").write_bytes(to_guest)
    host("qemu-io", "-f", "raw", "-c", f"write -s {tmp_path / 'to_guest'} {MIB} {MIB}",
         lun_url(appliance, target["iqn"]))
    via_disk = run(["dd", f"if={guest_disk}", "bs=1M", "skip=1", "count=1", "iflag=direct",
                    "status=none"]).stdout
    assert sha(via_disk) == sha(to_guest)
    in_file = run(["dd", f"if={target['file']}", "bs=1M", "skip=1", "count=1",
                   "status=none"]).stdout
    assert sha(in_file) == sha(to_guest)

    run(["dd", f"of={guest_disk}", "bs=1M", "seek=3", "count=1", "iflag=fullblock",
         "oflag=direct", "conv=fsync", "status=none"], stdin=to_host)
    host("qemu-img", "convert", "-O", "raw", "--image-opts",
         lun_range_opts(appliance, target["iqn"], 3 * MIB, MIB), str(tmp_path / "from_guest"))
    assert sha((tmp_path / "from_guest").read_bytes()) == sha(to_host)


def test_iscsi_test_cu_not_below_baseline(appliance: Appliance, target: dict,
                                          tmp_path: Path) -> None:
    """SBC conformance of LIO fileio; set EVLU_UPDATE_BASELINE=1 to rewrite the baseline."""
    results = iscsi_test_cu.run(lun_url(appliance, target["iqn"]), tmp_path)
    passed = sum(len(r.passed) for r in results.values())
    failed = sum(len(r.failed) for r in results.values())
    REPORT.append(f"iscsi-test-cu, {len(results)} suites: {passed} pass / {failed} fail "
                  f"(log: {tmp_path / 'iscsi-test-cu.log'})")
    assert set(results) == set(iscsi_test_cu.SUITES), "suites missing from the results"
    assert passed > 0
    if os.environ.get("EVLU_UPDATE_BASELINE"):
        BASELINE.write_text(json.dumps(
            {"tool": "iscsi-test-cu (libiscsi-bin, Debian bookworm) --dataloss, from the host",
             "target": "LIO fileio, 64 MiB, write_back off, emulate_tpu/tpws on, "
                       "in the appliance VM (tests/vm/test_smoke.py)",
             "suites": {name: results[name].as_json() for name in iscsi_test_cu.SUITES}},
            indent=2) + "\n")
    baseline = json.loads(BASELINE.read_text())["suites"]
    assert set(baseline) == set(iscsi_test_cu.SUITES), "baseline and SUITES disagree"
    regressions = {name: sorted(set(results[name].failed) - set(base["failed"]))
                   for name, base in baseline.items()
                   if len(results[name].passed) < base["pass"]
                   or set(results[name].failed) - set(base["failed"])}
    assert not regressions, f"iscsi-test-cu regressions against {BASELINE.name}: {regressions}"
