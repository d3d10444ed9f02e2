"""Stock targetcli drives user:evlu through our D-Bus service, with and without tcmu-runner.

Standalone (``evlu tcmu serve --dbus standalone``, no tcmu-runner): targetcli
lists ``/backstores/user:evlu``, shows our ConfigDesc, asks our CheckConfig
(and prints its refusals), creates a device the kernel does not wait for
(the handler switched the reply mode off), the LUN serves data, and
saveconfig / clearconfig / restoreconfig round-trips it.  Beside tcmu-runner
(``--dbus beside-runner``): tcmu-runner lists our subtype next to its own and
proxies CheckConfig; a device needs ``control=nl_reply_supported=-1``, because
tcmu-runner answers the kernel for every device and refuses subtypes it did
not load.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.agent_client import Result
from appliance.vm import Appliance

from .test_smoke import host
from .test_tcmu import GUEST_SCRIPT, LUNDIR, MIB, opts, sh, sha, url

pytestmark = pytest.mark.vm

SERVE = ("systemd-run --unit={unit} -p EnvironmentFile=/etc/default/evlu-gateway "
         "/opt/evlu-gateway/venv/bin/evlu tcmu serve --dbus {mode}\n"
         "for i in $(seq 120); do journalctl -u {unit} | grep -q 'serving user:evlu' && break; "
         "sleep 1; done")
CONFIGFS = "/sys/kernel/config/target/core"


def targetcli(vm: Appliance, *args: str) -> Result:
    return vm.agent.run(["targetcli", *args], timeout=120, check=False)


def said(result: Result) -> str:
    return result.text + result.stderr.decode(errors="replace")


def attrib(vm: Appliance, name: str, attribute: str) -> str:
    return sh(vm, f"cat {CONFIGFS}/user_*/{name}/attrib/{attribute}").strip()


def wait_ready(lun: str) -> None:
    """NOT READY (04/01) until the handler has the key: libiscsi's login fails until then."""
    deadline = time.monotonic() + 120
    while subprocess.run(["iscsi-readcapacity16", lun], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"{lun} never became ready"
        time.sleep(2)


def export(vm: Appliance, *names: str) -> dict:
    return json.loads(vm.agent.run(["python3", "-", "export", *names],
                                   stdin=GUEST_SCRIPT.read_bytes(), timeout=120).stdout)


@pytest.fixture(scope="module")
def standalone(appliance: Appliance, guest_kms: str) -> Iterator[Appliance]:
    """Two eVLUs and a file without a header; our handler owning org.kernel.TCMUService1."""
    vm = appliance
    sh(vm, f"""
        for n in tc0 tc1 tc-bare; do truncate -s 64M {LUNDIR}/$n.img; done
        for n in tc0 tc1; do evlu format {LUNDIR}/$n.img --kms -q --yes --no-wipe >/dev/null; done
        {SERVE.format(unit="evlu-tcmu-standalone", mode="standalone")}""", timeout=400)
    yield vm
    vm.agent.run(["systemctl", "stop", "evlu-tcmu-standalone"], check=False)


def test_targetcli_creates_serves_and_restores_user_evlu(standalone: Appliance,
                                                         tmp_path: Path) -> None:
    vm = standalone
    assert "user:evlu" in said(targetcli(vm, "/backstores", "ls"))
    assert "the eVLU backing file or block device" in said(
        targetcli(vm, "/backstores/user:evlu", "help", "create"))
    # Refusals come from our CheckConfig, word for word.
    for cfg, why in ((f"{LUNDIR}/tc-bare.img", "has no eVLU header: run 'evlu format"),
                     (f"{LUNDIR}/missing.img", "No such file or directory"),
                     ("relative.img", "must be an absolute path")):
        refused = targetcli(vm, "/backstores/user:evlu", "create", "name=refused", "size=48M",
                            f"cfgstring={cfg}")
        assert refused.rc != 0 and why in said(refused), said(refused)
    created = targetcli(vm, "/backstores/user:evlu", "create", "name=tc0", "size=48M",
                        f"cfgstring={LUNDIR}/tc0.img")
    assert created.rc == 0, said(created)
    # No control= was given: the kernel takes the module's reply mode, which the
    # handler switched off, so this device is never waited for.
    assert attrib(vm, "tc0", "nl_reply_supported") == "0"
    assert "command reply support 0" in sh(vm, "dmesg | grep 'tcmu daemon' | tail -1")
    target = export(vm, "tc0")
    lun = url(vm, target["iqn"], target["luns"]["tc0"]["lun"])
    data = os.urandom(MIB)
    (tmp_path / "piece").write_bytes(data)
    wait_ready(lun)
    host("qemu-io", "-f", "raw", "-c", f"write -s {tmp_path / 'piece'} {5 * MIB} {MIB}", lun)

    def read_back() -> str:
        wait_ready(lun)  # again after a restore
        host("qemu-img", "convert", "-O", "raw", "--image-opts",
             opts(vm, target["iqn"], target["luns"]["tc0"]["lun"], 5 * MIB, MIB),
             str(tmp_path / "back"))
        return sha((tmp_path / "back").read_bytes())

    assert read_back() == sha(data)
    # The whole configuration, our backstore included, saved, cleared and restored
    # while the handler runs (rtslib writes attributes back: RECONFIG events).
    saved = "/root/evlu-targetcli-test.json"
    assert targetcli(vm, "saveconfig", saved).rc == 0
    so = next(o for o in json.loads(sh(vm, f"cat {saved}"))["storage_objects"]
              if o["name"] == "tc0")
    assert (so["plugin"], so["config"], so["size"]) == ("user", f"evlu/{LUNDIR}/tc0.img", 48 * MIB)
    assert targetcli(vm, "clearconfig", "confirm=True").rc == 0
    assert "tc0: detached" in sh(vm, "journalctl -u evlu-tcmu-standalone")
    restored = targetcli(vm, "restoreconfig", saved)
    assert restored.rc == 0 and "Configuration restored" in said(restored), said(restored)
    assert attrib(vm, "tc0", "dev_size") == str(48 * MIB)
    assert read_back() == sha(data)
    deleted = targetcli(vm, "/backstores/user:evlu", "delete", "tc0")
    assert deleted.rc == 0, said(deleted)
    assert "tc0" not in said(targetcli(vm, "/backstores/user:evlu", "ls"))


def test_beside_tcmu_runner(standalone: Appliance) -> None:
    vm = standalone
    sh(vm, f"""
        systemctl stop evlu-tcmu-standalone
        systemctl unmask tcmu-runner >/dev/null 2>&1; systemctl start tcmu-runner
        {SERVE.format(unit="evlu-tcmu-beside", mode="beside-runner")}""", timeout=300)
    try:
        listing = said(targetcli(vm, "ls", "/backstores"))
        assert "user:evlu" in listing and "user:qcow" in listing, listing
        # tcmu-runner proxies CheckConfig to us ...
        refused = targetcli(vm, "/backstores/user:evlu", "create", "name=tc1", "size=48M",
                            f"cfgstring={LUNDIR}/tc-bare.img")
        assert refused.rc != 0 and "has no eVLU header" in said(refused), said(refused)
        # ... but answers the kernel itself, with -ENOENT for a subtype it did not load.
        plain = targetcli(vm, "/backstores/user:evlu", "create", "name=tc1", "size=48M",
                          f"cfgstring={LUNDIR}/tc1.img")
        assert plain.rc != 0 and "creation failed" in said(plain), said(plain)
        created = targetcli(vm, "/backstores/user:evlu", "create", "name=tc1", "size=48M",
                            f"cfgstring={LUNDIR}/tc1.img", "control=nl_reply_supported=-1")
        assert created.rc == 0, said(created)
        assert attrib(vm, "tc1", "nl_reply_supported") == "-1"
        target = export(vm, "tc1")
        lun = url(vm, target["iqn"], target["luns"]["tc1"]["lun"])
        wait_ready(lun)
        assert "Vendor:EVLU" in host("iscsi-inq", lun)
        assert "tc1: serving" in sh(vm, "journalctl -u evlu-tcmu-beside")
    finally:
        targetcli(vm, "/backstores/user:evlu", "delete", "tc1")
        vm.agent.run("systemctl stop evlu-tcmu-beside tcmu-runner; systemctl mask tcmu-runner",
                     check=False)
