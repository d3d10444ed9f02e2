"""``evlu lio``: lio.toml applied to the real kernel target through rtslib-fb.

In the appliance: a KMS of its own (a separate config dir and port, so the
other VM tests' KMS is untouched), three eVLUs, our handler serving them, and
``evlu lio apply`` of two targets with ACLs, CHAP (one mutual), mapped LUNs
and discovery authentication.  From the host, libiscsi logs in with the right
secrets and is refused with wrong ones.  Then: apply again changes nothing,
removed entries are removed, a failing apply leaves LIO as it was, the boot
path restores LIO from lio.toml beside rtslib's own saved objects, and no
secret reaches the journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import REPORT

from appliance.vm import Appliance

pytestmark = pytest.mark.vm

DIR = "/var/lib/evlu-lio"
ETC = f"{DIR}/etc"
ENV = (f"set -e; . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "
       f"export EVLU_CONFIG_DIR={ETC}; ")
# start the handler, and wait until it listens (this start's line, not an earlier one's)
HANDLER = f"""
    since=$(date +%s)
    systemd-run --unit=evlu-lio-tcmu -p EnvironmentFile=/etc/default/evlu-gateway \\
        -E EVLU_CONFIG_DIR={ETC} /opt/evlu-gateway/venv/bin/evlu tcmu serve --dbus off
    for i in $(seq 120); do
        journalctl -u evlu-lio-tcmu --since @$since | grep -q "serving user:evlu" && break
        sleep 1
    done
"""
T1, T2 = "iqn.2003-01.org.example.evlu:t1", "iqn.2003-01.org.example.evlu:t2"
H1, H2 = "iqn.2024-01.org.example:host1", "iqn.2024-01.org.example:host2"
SECRETS = {"h1": "LioTestHost1Secret", "gw": "LioTestMutualSecret", "h2": "LioTestHost2Secret",
           "disc": "LioTestDiscoverySecret"}
CHAP = f"""
[host1]
userid = "host1"
password = "{SECRETS['h1']}"
mutual_userid = "gateway"
mutual_password = "{SECRETS['gw']}"

[host2]
userid = "host2"
password = "{SECRETS['h2']}"

[disc]
userid = "disc"
password = "{SECRETS['disc']}"
"""
FULL = f"""
[discovery]
chap = "disc"

[[targets]]
iqn = "{T1}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "{DIR}/a.img" }},
        {{ lun = 1, path = "{DIR}/b.img", block_size = 4096, write_cache = true }}]
acls = [{{ initiator = "{H1}", chap = "host1", mapped_luns = [{{ lun = 0 }}, {{ lun = 1 }}] }},
        {{ initiator = "{H2}", chap = "host2", mapped_luns = [{{ lun = 1, mapped_lun = 0 }}] }}]

[[targets]]
iqn = "{T2}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "{DIR}/a.img" }}, {{ lun = 1, path = "{DIR}/c.img" }}]
acls = [{{ initiator = "{H1}", chap = "host1", mapped_luns = [{{ lun = 0 }}, {{ lun = 1 }}] }}]
"""
# host2's ACL and t2's LUN 1 (the only user of c.img) removed
SMALLER = f"""
[discovery]
chap = "disc"

[[targets]]
iqn = "{T1}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "{DIR}/a.img" }},
        {{ lun = 1, path = "{DIR}/b.img", block_size = 4096, write_cache = true }}]
acls = [{{ initiator = "{H1}", chap = "host1", mapped_luns = [{{ lun = 0 }}, {{ lun = 1 }}] }}]

[[targets]]
iqn = "{T2}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "{DIR}/a.img" }}]
acls = [{{ initiator = "{H1}", chap = "host1", mapped_luns = [{{ lun = 0 }}] }}]
"""
DUMP = """
import json
from rtslib_fb import RTSRoot
d = RTSRoot().dump()
print(json.dumps({"targets": d["targets"], "storage_objects": d["storage_objects"],
                  "fabric_modules": d["fabric_modules"]}, sort_keys=True))
"""


def sh(vm: Appliance, script: str, timeout: float = 180, check: bool = True) -> str:
    result = vm.agent.run(ENV + script, timeout=timeout, check=check)
    return result.text + result.stderr.decode()


def put(vm: Appliance, path: str, text: str, mode: str = "644") -> None:
    vm.agent.run(["sh", "-c", f"umask 077; cat > {path}.tmp && chmod {mode} {path}.tmp && "
                              f"mv {path}.tmp {path}"], stdin=text.encode())


def lio(vm: Appliance, *args: str, check: bool = True) -> tuple[int, str]:
    result = vm.agent.run(["sh", "-c", ENV + "exec evlu lio " + " ".join(args) + " 2>&1"],
                          timeout=180, check=False)
    assert not check or result.rc == 0, result.text
    return result.rc, result.text


def dump(vm: Appliance) -> dict:
    return json.loads(vm.agent.run(["python3", "-"], stdin=DUMP.encode()).stdout)


def ours(state: dict) -> dict:
    """Our targets and user:evlu backstores, by name."""
    return {"targets": {t["wwn"]: t for t in state["targets"] if t["wwn"] in (T1, T2)},
            "backstores": {s["name"]: s for s in state["storage_objects"]
                           if s["plugin"] == "user"}}


def inq(vm: Appliance, iqn: str, lun: int, initiator: str, user: str = "", password: str = "",
        mutual: tuple[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    creds = f"{user}%{password}@" if user else ""
    env = dict(os.environ)
    if mutual:
        env |= {"LIBISCSI_CHAP_TARGET_USERNAME": mutual[0],
                "LIBISCSI_CHAP_TARGET_PASSWORD": mutual[1]}
    return subprocess.run(["iscsi-inq", "-i", initiator,
                           f"iscsi://{creds}127.0.0.1:{vm.ports['iscsi']}/{iqn}/{lun}"],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def gateway(appliance: Appliance, guest_kms: str) -> Iterator[Appliance]:
    """Three eVLUs keyed by the session's KMS, the handler; LIO cleaned up afterwards."""
    start = time.monotonic()
    sh(appliance, f"""
        {guest_kms.format(dir=ETC)}
        for n in a b c; do truncate -s 40M {DIR}/$n.img; done
        evlu format {DIR}/a.img --kms -q --yes --no-wipe >/dev/null
        evlu format {DIR}/b.img --kms -q --yes --no-wipe --sector-size 4096 >/dev/null
        evlu format {DIR}/c.img --kms -q --yes --no-wipe >/dev/null
        {HANDLER}
    """, timeout=400)
    put(appliance, f"{ETC}/chap.toml", CHAP, "600")
    REPORT.append(f"lio: 3 eVLUs and the handler ready in {time.monotonic() - start:.0f} s")
    try:
        yield appliance
    finally:
        put(appliance, f"{ETC}/lio.toml", "")
        lio(appliance, "apply", check=False)
        appliance.agent.run(["systemctl", "stop", "evlu-lio-tcmu"], check=False)
        appliance.agent.run(["systemctl", "reset-failed", "evlu-lio-tcmu"], check=False)


def wait_ready(vm: Appliance, iqn: str, lun: int, *login: str) -> None:
    deadline = time.monotonic() + 120
    while (got := inq(vm, iqn, lun, *login)).returncode != 0:
        assert time.monotonic() < deadline, f"{iqn}/{lun} never answered: {got.stderr}"
        time.sleep(2)


def test_apply_check_state_idempotent_chap(gateway: Appliance) -> None:
    vm = gateway
    put(vm, f"{ETC}/lio.toml", FULL)
    start = time.monotonic()
    rc, out = lio(vm, "apply")
    REPORT.append(f"lio: first apply ({out.count(chr(10)) - 1} changes) in "
                  f"{time.monotonic() - start:.1f} s")
    assert "applied" in out and all(s not in out for s in SECRETS.values())
    state = ours(dump(vm))
    assert set(state["targets"]) == {T1, T2} and len(state["backstores"]) == 3
    b = next(s for s in state["backstores"].values() if s["config"].endswith("/b.img"))
    assert b["control"].split(",")[1] == "hw_block_size=4096" and b["hw_max_sectors"] == 2048
    assert b["size"] == 40 * 2**20 - 16 * 2**20
    assert b["attributes"]["emulate_write_cache"] == 1  # write_cache = true
    assert all(s["attributes"]["emulate_write_cache"] == 0 for s in state["backstores"].values()
               if s is not b)
    tpg = state["targets"][T1]["tpgs"][0]
    assert tpg["enable"] and tpg["attributes"]["authentication"] == 1
    assert tpg["attributes"]["generate_node_acls"] == 0
    acls = {a["node_wwn"]: a for a in tpg["node_acls"]}
    assert acls[H1]["chap_userid"] == "host1" and acls[H1]["chap_mutual_userid"] == "gateway"
    assert [(m["index"], m["tpg_lun"]) for m in acls[H2]["mapped_luns"]] == [(0, 1)]
    # the same backstore behind LUN 0 of both targets
    lun0 = {t: next(x["storage_object"] for x in state["targets"][t]["tpgs"][0]["luns"]
                    if x["index"] == 0) for t in (T1, T2)}
    assert lun0[T1] == lun0[T2]
    assert lio(vm, "apply")[1].strip() == "LIO matches the configuration: nothing to do"
    # CHAP from the host: right secrets log in, a wrong one is refused
    wait_ready(vm, T1, 0, H1, "host1", SECRETS["h1"], ("gateway", SECRETS["gw"]))
    assert inq(vm, T1, 0, H1, "host1", "WrongSecret12345").returncode != 0
    assert inq(vm, T1, 0, H1).returncode != 0                          # no CHAP at all
    assert inq(vm, T1, 0, H1, "host1", SECRETS["h1"],
               ("gateway", "WrongMutual12345")).returncode != 0        # target not proven
    wait_ready(vm, T1, 0, H2, "host2", SECRETS["h2"])                  # host2's LUN 0 = b.img
    assert "Vendor:EVLU" in inq(vm, T1, 0, H2, "host2", SECRETS["h2"]).stdout
    assert inq(vm, T1, 0, "iqn.2024-01.org.example:stranger", "host2",
               SECRETS["h2"]).returncode != 0                          # no ACL, no login
    # discovery authentication
    portal = f"iscsi://disc%{SECRETS['disc']}@127.0.0.1:{vm.ports['iscsi']}"
    listed = subprocess.run(["iscsi-ls", "-i", H1, portal], capture_output=True, text=True,
                            timeout=60)
    assert T1 in listed.stdout and T2 in listed.stdout, listed.stderr
    refused = subprocess.run(["iscsi-ls", "-i", H1, f"iscsi://127.0.0.1:{vm.ports['iscsi']}"],
                             capture_output=True, text=True, timeout=60)
    assert T1 not in refused.stdout


def test_removed_entries_are_removed(gateway: Appliance) -> None:
    vm = gateway
    put(vm, f"{ETC}/lio.toml", SMALLER)
    rc, out = lio(vm, "apply")
    assert f"delete acl {T1} tpg 1 acl {H2}" in out and f"delete lun {T2} tpg 1 lun 1" in out
    state = ours(dump(vm))
    assert {a["node_wwn"] for a in state["targets"][T1]["tpgs"][0]["node_acls"]} == {H1}
    assert [x["index"] for x in state["targets"][T2]["tpgs"][0]["luns"]] == [0]
    assert not any(s["config"].endswith("/c.img") for s in state["backstores"].values())
    assert inq(vm, T1, 0, H2, "host2", SECRETS["h2"]).returncode != 0
    assert lio(vm, "apply")[1].strip() == "LIO matches the configuration: nothing to do"


def test_a_failing_apply_leaves_lio_as_it_was(gateway: Appliance) -> None:
    vm = gateway
    before = dump(vm)
    # valid for check and plan; the kernel refuses the attribute midway through the apply
    failing = FULL.replace(f'iqn = "{T2}"\n[[targets.tpgs]]',
                           f'iqn = "{T2}"\n[[targets.tpgs]]\nattributes = {{ no_such_knob = 1 }}')
    put(vm, f"{ETC}/lio.toml", failing)
    assert lio(vm, "check")[0] == 0 and lio(vm, "plan")[0] == 0
    rc, out = lio(vm, "apply", check=False)
    assert rc == 1, out
    assert "no_such_knob" in out and "rolled back: LIO is as it was before this apply" in out
    assert dump(vm) == before
    # a backing file that vanished: refused before anything changes
    put(vm, f"{ETC}/lio.toml", FULL.replace(f"{DIR}/c.img", f"{DIR}/gone.img"))
    rc, out = lio(vm, "apply", check=False)
    assert rc == 2 and f"{DIR}/gone.img: No such file or directory" in out
    assert dump(vm) == before


def test_boot_restores_lio_and_keeps_secrets_out_of_sight(gateway: Appliance) -> None:
    vm = gateway
    put(vm, f"{ETC}/lio.toml", FULL)
    lio(vm, "apply")
    # an admin's own fileio target, saved by rtslib together with ours
    sh(vm, f"""
        truncate -s 8M {DIR}/admin.img
        targetcli /backstores/fileio create admin {DIR}/admin.img >/dev/null
        targetcli /iscsi create iqn.2003-01.org.example:admin >/dev/null
        targetcli /iscsi/iqn.2003-01.org.example:admin/tpg1/luns create \\
            /backstores/fileio/admin >/dev/null
        targetctl save
    """)
    saved = sh(vm, "stat -c %a /etc/rtslib-fb-target/saveconfig.json; "
                   "grep -c LioTestHost1Secret /etc/rtslib-fb-target/saveconfig.json || true")
    mode, count = saved.split()
    assert mode == "600" and count != "0"   # rtslib keeps secrets root-only too
    expected = ours(dump(vm))
    # shutdown clears LIO (targetctl clear); boot: rtslib's file minus ours, then lio.toml,
    # then the handler starts (as at boot: it attaches to the devices that exist)
    booted = sh(vm, f"""
        systemctl stop evlu-lio-tcmu; targetctl clear; evlu lio boot 2>&1
        {HANDLER}""", timeout=400)
    after = dump(vm)
    assert any(t["wwn"] == "iqn.2003-01.org.example:admin" for t in after["targets"])
    restored = ours(after)
    for name, so in expected["backstores"].items():
        assert {k: so[k] for k in ("config", "size", "wwn", "control")} == \
            {k: restored["backstores"][name][k] for k in ("config", "size", "wwn", "control")}
    assert restored["targets"].keys() == expected["targets"].keys()
    # With no handler listening at boot the kernel refused b.img's write cache; the first
    # apply with the handler running (gatewayd's, at start) switches it on.
    assert "write cache left off until the user:evlu handler runs" in booted
    rc, out = lio(vm, "apply")
    assert "write_cache False -> True" in out and out.count("update backstore") == 1, out
    assert lio(vm, "apply")[1].strip() == "LIO matches the configuration: nothing to do"
    wait_ready(vm, T1, 0, H1, "host1", SECRETS["h1"], ("gateway", SECRETS["gw"]))
    sh(vm, "targetcli /iscsi delete iqn.2003-01.org.example:admin >/dev/null; "
           "targetcli /backstores/fileio delete admin >/dev/null; "
           "rm -f /etc/rtslib-fb-target/saveconfig.json")
    # the secrets are in no log, and configfs shows them to root only
    journal = vm.agent.run(["journalctl", "-o", "cat", "--no-pager"], timeout=60).stdout
    assert not any(s.encode() in journal for s in SECRETS.values())
    modes = sh(vm, f"stat -c %a /sys/kernel/config/target/iscsi/{T1}/tpgt_1/acls/{H1}"
                   "/auth/password /sys/kernel/config/target/iscsi/discovery_auth/password")
    assert modes.split() == ["600", "600"]
