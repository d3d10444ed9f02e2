"""Demos in a running appliance: ``make run``'s encrypted LUN served by gatewayd, and
a plain LIO fileio LUN in demo mode (``appliance/run --demo-lun``, the smoke test)."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
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


# -- make run: an encrypted LUN served by gatewayd --------------------------------------

EVLU_IQN = "iqn.2003-01.org.linux-iscsi.evlu-appliance:demo-evlu"
EVLU_INITIATOR = "iqn.2024-01.org.example:evlu-demo-initiator"
EVLU_PATH = "/var/lib/evlu/demo.img"
EVLU_SCRIPT = Path(__file__).resolve().parent / "guest" / "demo_evlu.py"
CHAP_USER = "demo"
IFACE = "evlu-demo"
ENV = ". /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "


@dataclass
class EvluDemo:
    """What ``make run`` made in the appliance, and how to reach it from the host."""

    portal: str  # 127.0.0.1:PORT on the host
    iqn: str
    lun: int
    initiator: str
    user: str
    password: str
    credentials: Path  # 0600, in the run directory
    path: str  # the eVLU's backing file in the guest
    size: int
    capacity: int
    key_id: str
    metrics: str
    seconds: float

    def libiscsi(self) -> list[str]:
        url = f"iscsi://{self.user}%{self.password}@{self.portal}"
        return [f"iscsi-inq -i {self.initiator} {url}/{self.iqn}/{self.lun}",
                f"iscsi-readcapacity16 -i {self.initiator} {url}/{self.iqn}/{self.lun}",
                f"iscsi-ls -i {self.initiator} {url}"]

    def open_iscsi(self) -> list[str]:
        node = f"iscsiadm -m node -T {self.iqn} -p {self.portal} -I {IFACE}"
        auth = {"authmethod": "CHAP", "username": self.user, "password": self.password}
        return [f"iscsiadm -m iface -I {IFACE} --op new",
                f"iscsiadm -m iface -I {IFACE} --op update -n iface.initiatorname "
                f"-v {self.initiator}",
                f"{node} --op new",
                *(f"{node} --op update -n node.session.auth.{k} -v {v}" for k, v in auth.items()),
                f"{node} --login"]

    def instructions(self) -> str:
        mib = 1 << 20
        return "\n".join([
            "evlu appliance: an encrypted LUN (eVLU) served by gatewayd, its key in the "
            "embedded KMS",
            f"  portal       {self.portal} (the appliance's iSCSI port 3260)",
            f"  target       {self.iqn}",
            f"  LUN          {self.lun}: {self.capacity // mib} MiB (eVLU {self.path}, "
            f"{self.size // mib} MiB, KMS key id {self.key_id})",
            f"  initiator    {self.initiator} (the only one its ACL admits)",
            f"  CHAP         user {self.user}, credentials in {self.credentials}",
            f"  metrics      {self.metrics}",
            "",
            "libiscsi (libiscsi-bin):",
            *(f"  {line}" for line in self.libiscsi()),
            "",
            "open-iscsi (as root; iscsid running):",
            *(f"  {line}" for line in self.open_iscsi()),
            f"  (then: iscsiadm -m node -T {self.iqn} -p {self.portal} -I {IFACE} --logout)",
        ])


def provision_evlu_demo(vm: Appliance, run_dir: Path, size: int = 256 << 20,
                        path: str = EVLU_PATH) -> EvluDemo:
    """The embedded KMS, a ``size`` eVLU keyed by it, lio.toml with one target whose ACL
    admits one initiator with CHAP (a new random secret), gatewayd started; the host's
    credentials file written (0600)."""
    start = time.monotonic()
    password = secrets.token_hex(12)
    vm.agent.run(["sh", "-c", "mkdir -p /etc/evlu-gateway && umask 077 && "
                              "cat > /etc/evlu-gateway/chap.toml"],
                 stdin=f'[{CHAP_USER}]\nuserid = "{CHAP_USER}"\npassword = "{password}"\n'
                 .encode())
    vm.agent.run(["sh", "-c", "cat > /run/evlu-demo.py"], stdin=EVLU_SCRIPT.read_bytes())
    # open-iscsi in the appliance too (the printed commands work there as on a host)
    vm.agent.run(["sh", "-c", "mkdir -p /run/lock/iscsi && systemctl start iscsid"])
    made = json.loads(vm.agent.run(
        ["sh", "-c", ENV + f"exec python3 /run/evlu-demo.py --iqn {EVLU_IQN} --initiator "
                           f"{EVLU_INITIATOR} --path {path} --size {size}"],
        timeout=1200).stdout)
    portal = f"127.0.0.1:{vm.ports['iscsi']}"
    credentials = run_dir / "chap-credentials"
    credentials.unlink(missing_ok=True)
    fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# evlu appliance demo: CHAP of {EVLU_INITIATOR} for {EVLU_IQN} at {portal}\n"
                f"portal={portal}\ntarget={EVLU_IQN}\ninitiator={EVLU_INITIATOR}\n"
                f"username={CHAP_USER}\npassword={password}\n")
    return EvluDemo(portal, EVLU_IQN, 0, EVLU_INITIATOR, CHAP_USER, password, credentials, path,
                    made["size"], made["capacity"], made["key_id"],
                    f"http://127.0.0.1:{vm.ports['metrics']}/metrics",
                    round(time.monotonic() - start, 1))
