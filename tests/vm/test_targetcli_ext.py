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

from .test_smoke import host

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
