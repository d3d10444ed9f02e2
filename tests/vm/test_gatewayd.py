"""gatewayd as the appliance runs it: its systemd unit (Type=notify, Restart=on-failure).

The unit starts only once /etc/evlu-gateway/gatewayd.conf exists; this test
writes one, starts the unit, checks READY, the control socket and the metrics
endpoint, kills the daemon with SIGKILL and checks systemd brings it back,
then stops it and removes the file (the TCMU tests run a handler of their own).
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import REPORT

from appliance.vm import Appliance

pytestmark = pytest.mark.vm

ENV = "set -e; . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "
CONF = "/etc/evlu-gateway/gatewayd.conf"
METRICS = ("python3 -c \"import urllib.request; print(urllib.request.urlopen("
           "'http://127.0.0.1:9561/metrics', timeout=10).read().decode())\"")


def sh(vm: Appliance, script: str, timeout: float = 120, check: bool = True) -> str:
    return vm.agent.run(ENV + script, timeout=timeout, check=check).text


def unit(vm: Appliance) -> dict[str, str]:
    out = sh(vm, "systemctl show evlu-gatewayd -p ActiveState,SubState,Type,MainPID,NRestarts,"
                 "Result")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_unit_gets_ready_serves_and_comes_back_after_sigkill(appliance: Appliance) -> None:
    start = time.monotonic()
    try:
        assert unit(appliance)["ActiveState"] == "inactive"  # the guard: no gatewayd.conf
        sh(appliance, f"mkdir -p /etc/evlu-gateway; printf 'dbus = \"off\"\\n' >{CONF}; "
                      "systemctl start evlu-gatewayd", timeout=200)  # returns at READY=1
        ready = time.monotonic() - start
        first = unit(appliance)
        assert (first["Type"], first["ActiveState"], first["SubState"]) == \
            ("notify", "active", "running")
        modes = sh(appliance, "stat -c '%a %U' /run/evlu-gateway /run/evlu-gateway/control.sock")
        assert modes.split() == ["700", "root", "600", "root"]
        status = json.loads(sh(appliance, "evlu daemon status --json"))
        assert status["health"]["live"] and status["health"]["ready"]
        assert status["pid"] == int(first["MainPID"])
        sh(appliance, "truncate -s 32M /var/lib/gwtest.img")
        added = json.loads(sh(appliance, "evlu lun add /var/lib/gwtest.img --plain --json"))
        assert added["state"] == "UNENCRYPTED" and added["name"] == "gwtest"
        metrics = sh(appliance, METRICS)
        assert "evlu_gatewayd_ready 1.0" in metrics
        assert 'evlu_lun_state{lun="gwtest",state="UNENCRYPTED"} 1.0' in metrics
        journal = sh(appliance, "journalctl -u evlu-gatewayd -o cat --no-pager")
        assert any(json.loads(line).get("message", "").startswith("gatewayd")
                   for line in journal.splitlines() if line.startswith("{"))

        sh(appliance, "systemctl kill -s SIGKILL evlu-gatewayd")
        deadline = time.monotonic() + 120
        while True:
            now = unit(appliance)
            if now["ActiveState"] == "active" and now["MainPID"] not in ("0", first["MainPID"]):
                break
            assert time.monotonic() < deadline, f"gatewayd not restarted: {now}"
            time.sleep(1)
        assert int(now["NRestarts"]) == int(first["NRestarts"]) + 1
        again = json.loads(sh(appliance, "evlu daemon status --json"))
        assert again["pid"] == int(now["MainPID"]) and again["health"]["ready"]
        stop = time.monotonic()
        sh(appliance, "systemctl stop evlu-gatewayd")
        stopped = time.monotonic() - stop
        assert unit(appliance)["ActiveState"] == "inactive"
        assert "gatewayd stopped" in sh(appliance, "journalctl -u evlu-gatewayd -o cat "
                                                   "--no-pager | tail -n 5")
        REPORT.append(f"gatewayd unit: READY {ready:.0f} s after start, back after SIGKILL, "
                      f"stopped in {stopped:.1f} s; test {time.monotonic() - start:.0f} s")
    finally:
        sh(appliance, f"systemctl stop evlu-gatewayd; rm -f {CONF} /var/lib/gwtest.img",
           check=False)
