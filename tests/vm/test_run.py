"""``make run``: what it provisions, and that the commands it prints work as printed.

``make run`` is ``appliance/run --demo``: boot, :func:`appliance.demo.provision_evlu_demo`,
print :meth:`~appliance.demo.EvluDemo.instructions`.  Here the same provisioning runs
in the session's appliance (whose KMS exists already: it is reused), then every
printed libiscsi line runs from the host, and the printed open-iscsi lines run in the
appliance, whose 127.0.0.1:3260 is the same portal (the host's forwarded port is a free
one in tests: the lines are run with 3260 in its place).
"""

from __future__ import annotations

import shlex
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPORT

from appliance.demo import EVLU_IQN, EVLU_PATH, IFACE, provision_evlu_demo
from appliance.vm import Appliance

pytestmark = pytest.mark.vm


def test_make_run_provisions_and_its_printed_commands_work(appliance: Appliance, guest_kms: str,
                                                          tmp_path: Path) -> None:
    vm = appliance
    start = time.monotonic()
    try:
        demo = provision_evlu_demo(vm, tmp_path)
        text = demo.instructions()
        assert stat.S_IMODE(demo.credentials.stat().st_mode) == 0o600
        assert f"password={demo.password}" in demo.credentials.read_text()
        assert demo.capacity == 240 << 20 and demo.portal in text and demo.iqn in text
        printed = [line.strip() for line in text.splitlines()]
        libiscsi = [line for line in printed if line.startswith("iscsi-")]
        assert libiscsi == demo.libiscsi()
        outputs = {}
        for line in libiscsi:
            done = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{line}: {done.stderr}"
            outputs[line.split()[0]] = done.stdout
        assert "Vendor:EVLU" in outputs["iscsi-inq"]
        assert f"Total size:{demo.capacity}" in outputs["iscsi-readcapacity16"]
        assert f"Target:{demo.iqn}" in outputs["iscsi-ls"]
        iscsiadm = [line.replace(demo.portal, "127.0.0.1:3260") for line in printed
                    if line.startswith("iscsiadm")]
        assert len(iscsiadm) == len(demo.open_iscsi())
        for line in iscsiadm:
            done = vm.agent.run(shlex.split(line), timeout=120, check=False)
            assert done.rc == 0, f"{line}: {done.text}{done.stderr.decode()}"
        link = f"/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-{demo.iqn}-lun-{demo.lun}"
        size = vm.agent.run(["sh", "-c", f"udevadm settle; blockdev --getsize64 $(readlink -e "
                                         f"{link})"]).text.strip()
        assert int(size) == demo.capacity
        wrong = subprocess.run(shlex.split(libiscsi[0].replace(demo.password, "0" * 24)),
                               capture_output=True, text=True, timeout=120)
        assert wrong.returncode != 0
        REPORT.append(f"make run: provisioned in {demo.seconds:.0f} s (KMS reused); its "
                      f"{len(libiscsi)} libiscsi lines from the host and {len(iscsiadm)} "
                      f"open-iscsi lines in the appliance work as printed; "
                      f"{time.monotonic() - start:.0f} s")
    finally:
        vm.agent.run(["sh", "-c", f"""
            iscsiadm -m node -T {EVLU_IQN} -p 127.0.0.1:3260 -I {IFACE} --logout
            iscsiadm -m node -T {EVLU_IQN} -p 127.0.0.1:3260 -I {IFACE} --op delete
            iscsiadm -m iface -I {IFACE} --op delete
            : > /etc/evlu-gateway/lio.toml
            . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE
            python3 -c "from gateway.daemon.client import call; call('apply', {{}})"
            systemctl stop evlu-gatewayd
            rm -f /etc/evlu-gateway/gatewayd.conf /etc/evlu-gateway/lio.toml \\
                /etc/evlu-gateway/chap.toml /etc/evlu-gateway/lio-owned.json {EVLU_PATH}"""],
            timeout=300, check=False)
