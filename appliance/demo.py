"""A demo iSCSI target in a running appliance (LIO fileio LUN 0, demo mode)."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.vm import Appliance

DEMO_IQN = "iqn.2003-01.org.linux-iscsi.evlu-appliance:demo"
GUEST_SCRIPT = Path(__file__).resolve().parent / "guest" / "demo_target.py"


def create_demo_target(vm: Appliance, size: int = 64 << 20, iqn: str = DEMO_IQN,
                       path: str = "/var/lib/evlu-demo/lun0.img") -> dict:
    """Create the target in the guest; return its summary (iqn, lun, file, size, seconds)."""
    vm.agent.run(["mkdir", "-p", str(Path(path).parent)])
    result = vm.agent.run(["python3", "-", "--iqn", iqn, "--file", path, "--size", str(size)],
                          stdin=GUEST_SCRIPT.read_bytes(), timeout=120)
    return json.loads(result.stdout)


def lun_url(vm: Appliance, iqn: str = DEMO_IQN, lun: int = 0) -> str:
    """The direct iSCSI URL of a LUN through the forwarded port (SendTargets would
    advertise the guest's NAT address, which the host cannot reach)."""
    return f"iscsi://127.0.0.1:{vm.ports['iscsi']}/{iqn}/{lun}"
