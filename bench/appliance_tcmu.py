"""user:evlu vs tcmu-runner vs LIO fileio on the real kernel, in one appliance VM run.

Boots the dev appliance (QEMU; TCG on this project's build machines), sets up
the embedded KMS and formats an eVLU through it, starts tcmu-runner and our
handler side by side (``evlu tcmu serve --dbus beside-runner``, which leaves
tcmu-runner's netlink reply mode alone; ours are created with
``nl_reply_supported=-1``, so that mode does not touch them),
and exports five LUNs of the same size behind one target (see
bench/guest/tcmu_luns.py): ``user:evlu`` (encrypted, key from the KMS),
``user:qcow`` (tcmu-runner 1.5.4's qcow handler serving a raw file), LIO
``fileio``, ``user:evlu plain`` (our handler without XTS: under TCG the
guest's AES instructions are emulated, and XTS of 1 MiB alone takes ~12 ms,
so this LUN shows what the handler itself costs), and ``user:evlu 4Kn``
(encrypted with 4096-byte sectors, 4096-byte blocks: one XTS call per 4 KiB).

The initiator is open-iscsi in the same guest over loopback (the host's
forwarded port goes through QEMU's user-mode network, which caps throughput
near 10 MB/s and would hide every difference); each LUN is its /dev/sdX, used
with O_DIRECT by bench/guest/aio_bench.py (Linux AIO, one thread, QD requests in
flight).  Every LUN is first written end to end (untimed), then measured one
after the other: 1 MiB sequential write and read at QD 4, 4 KiB random write
and read at QD 16, SECONDS each.  The backing files sit in the guest's page
cache and every LUN caches writes (WCE=1, checked at the initiator), so what
differs is the path through each backstore.  Under TCG absolute
figures mean little: read the ratios.  ``make bench-appliance`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.agent_client import AgentError  # noqa: E402
from appliance.image import ensure_image  # noqa: E402
from appliance.vm import GUEST_PORTS, Appliance, choose_accel  # noqa: E402

GUEST = Path(__file__).resolve().parent / "guest"
ENV = "set -e; . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "
DIR = "/var/lib/evlu/bench"
KINDS = ("fileio", "user:qcow", "user:evlu", "user:evlu plain", "user:evlu 4Kn")
#: (name, pattern, block, depth, unit)
WORKLOADS = (("1 MiB seq write QD4", "seqwrite", 1 << 20, 4, "mb_s"),
             ("1 MiB seq read QD4", "seqread", 1 << 20, 4, "mb_s"),
             ("4 KiB rand write QD16", "randwrite", 4096, 16, "iops"),
             ("4 KiB rand read QD16", "randread", 4096, 16, "iops"))


def say(line: str) -> None:
    print(line, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sh(vm: Appliance, script: str, timeout: float = 600) -> str:
    return vm.agent.run(ENV + script, timeout=timeout).text


def set_up(vm: Appliance, size_mib: int, workers: int) -> dict:
    """KMS, eVLUs, tcmu-runner and our handler, the five LUNs, open-iscsi logged in."""
    sh(vm, f"""
        mkdir -p {DIR}
        evlu kms init >/dev/null && evlu kms enroll appliance >/dev/null
        systemctl start evlu-kms
        for i in $(seq 180); do evlu kms status >/dev/null 2>&1 && break; sleep 1; done
        truncate -s {size_mib + 16}M {DIR}/evlu.img {DIR}/evlu4k.img
        evlu format {DIR}/evlu.img --kms -q --yes >/dev/null
        evlu format {DIR}/evlu4k.img --kms -q --yes --sector-size 4096 >/dev/null
        systemctl unmask tcmu-runner >/dev/null 2>&1; systemctl start tcmu-runner
        systemd-run --unit=evlu-tcmu-bench -p EnvironmentFile=/etc/default/evlu-gateway \\
            /opt/evlu-gateway/venv/bin/evlu tcmu serve --dbus beside-runner --workers {workers}
        for i in $(seq 180); do
            journalctl -u evlu-tcmu-bench | grep -q "serving user:evlu" && break; sleep 1
        done
    """, timeout=900)
    summary = json.loads(vm.agent.run(
        ["python3", "-", f"{DIR}/evlu.img", f"{DIR}/qcow.raw", f"{DIR}/fileio.img",
         f"{DIR}/plain.img", f"{DIR}/evlu4k.img"],
        stdin=(GUEST / "tcmu_luns.py").read_bytes(), timeout=300).stdout)
    # all three of ours, before the initiator reads the caching mode page at login
    cached = "[ $(journalctl -u evlu-tcmu-bench | grep -c 'write cache on') -ge 3 ]"
    sh(vm, f"for i in $(seq 60); do {cached} && break; sleep 1; done; {cached}")
    portal = "127.0.0.1:3260"
    sh(vm, f"""
        modprobe iscsi_tcp; mkdir -p /run/lock/iscsi; systemctl start iscsid
        iscsiadm -m discovery -t sendtargets -p {portal} >/dev/null
        iscsiadm -m node -T {summary['iqn']} -p {portal} --login >/dev/null
        udevadm settle
    """)
    disks = {}
    for kind, lun in summary["luns"].items():
        link = f"/dev/disk/by-path/ip-{portal}-iscsi-{summary['iqn']}-lun-{lun}"
        disks[kind] = sh(vm, f"readlink -e {link}").strip()
    # what the initiator found in each LUN's caching mode page: all must be write back
    summary["cache"] = {kind: sh(vm, f"cat /sys/block/{disk.rsplit('/', 1)[-1]}/device/"
                                     "scsi_disk/*/cache_type").strip()
                        for kind, disk in disks.items()}
    if set(summary["cache"].values()) != {"write back"}:
        raise SystemExit(f"the LUNs do not all cache writes: {summary['cache']}")
    # The handler looks the key up when the device appears: NOT READY until then.
    for kind in ("user:evlu", "user:evlu 4Kn"):
        sh(vm, f"for i in $(seq 180); do sg_turs {disks[kind]} && break; sleep 1; done; "
               f"sg_turs {disks[kind]}")
    summary["disks"] = disks
    return summary


_XTS_PROBE = """
import json, os, timeit
from gateway.crypto import SectorCipher
def cost(sector_size, size, n):
    cipher = SectorCipher(os.urandom(64), sector_size)
    return min(timeit.repeat(lambda: cipher.decrypt_into(bytearray(size), 8), number=n,
                             repeat=3)) / n * 1e6
print(json.dumps({f"{sector}/{name}": cost(sector, size, n) for sector in (512, 4096)
                  for name, size, n in (("4k", 4096, 50), ("1m", 1 << 20, 3))}))
"""


def xts_cost(vm: Appliance) -> dict[str, float]:
    """Microseconds the handler's cipher takes in the guest for 4 KiB and 1 MiB, by
    sector size ("512/4k", ..., "4096/1m")."""
    return json.loads(vm.agent.run(
        ["sh", "-c", ENV + "/opt/evlu-gateway/venv/bin/python -"],
        stdin=_XTS_PROBE.encode(), timeout=300).stdout)


def measure(vm: Appliance, disk: str, pattern: str, block: int, depth: int,
            seconds: float) -> dict:
    return json.loads(vm.agent.run(
        ["python3", "-", disk, pattern, str(block), str(depth), str(seconds)],
        stdin=(GUEST / "aio_bench.py").read_bytes(), timeout=seconds + 300).stdout)


def fill(vm: Appliance, disk: str, size: int) -> float:
    start = time.monotonic()
    vm.agent.run(["dd", "if=/dev/zero", f"of={disk}", "bs=1M", f"count={size >> 20}",
                  "oflag=direct", "status=none"], timeout=1800)
    return time.monotonic() - start


def table(results: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Median per workload and LUN, and ours vs the others."""
    lines = ["| workload | fileio | user:qcow (tcmu-runner) | user:evlu | user:evlu plain | "
             "user:evlu 4Kn | evlu/fileio | evlu/tcmu-runner | evlu plain/tcmu-runner | "
             "evlu 4Kn/tcmu-runner |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, _pattern, _block, _depth, unit in WORKLOADS:
        med = {}
        for kind in KINDS:
            med[kind] = statistics.median(r[unit] for r in results[kind][name])
        label = "MB/s" if unit == "mb_s" else "IOPS"
        runner = med["user:qcow"]
        lines.append(f"| {name} | {med['fileio']:.0f} {label} | {runner:.0f} | "
                     f"{med['user:evlu']:.0f} | {med['user:evlu plain']:.0f} | "
                     f"{med['user:evlu 4Kn']:.0f} | "
                     f"{med['user:evlu'] / med['fileio']:.2f} | "
                     f"{med['user:evlu'] / runner:.2f} | "
                     f"{med['user:evlu plain'] / runner:.2f} | "
                     f"{med['user:evlu 4Kn'] / runner:.2f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="LUN size (%(default)s MiB)")
    parser.add_argument("--seconds", type=float, default=10, help="per workload and LUN "
                                                                  "(%(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the LUNs, "
                        "alternating their order; the median is reported (%(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="our handler's I/O threads "
                                                               "per device (%(default)s)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    image, _built = ensure_image(log=say)
    run_dir = Path(tempfile.mkdtemp(prefix="evlu-bench-appliance-"))
    vm = Appliance(image, run_dir, {name: _free_port() for name in GUEST_PORTS}, dev=True)
    try:
        vm.accel, why = choose_accel(image, os.environ.get("EVLU_QEMU_ACCEL", "auto"), run_dir)
        say(f"booting the appliance ({vm.accel}: {why}); logs in {run_dir}")
        vm.start()
        vm.wait_ready()
        start = time.monotonic()
        summary = set_up(vm, args.size_mib, args.workers)
        say(f"set up in {time.monotonic() - start:.0f} s: {summary['size'] >> 20} MiB LUNs "
            f"{summary['disks']} ({summary['cpus']} vCPUs); tcmu-runner and evlu tcmu serve "
            "running side by side")
        summary["xts_us"] = xts_cost(vm)
        for sector in (512, 4096):
            us = summary["xts_us"]
            say(f"the sector cipher ({sector}-byte sectors) takes {us[f'{sector}/4k']:.0f} us "
                f"for 4 KiB and {us[f'{sector}/1m'] / 1000:.1f} ms for 1 MiB in this guest")
        for kind in KINDS:
            seconds = fill(vm, summary["disks"][kind], summary["size"])
            say(f"  {kind}: written end to end in {seconds:.0f} s")
        results: dict[str, dict[str, list[dict]]] = {k: {w[0]: [] for w in WORKLOADS}
                                                     for k in KINDS}
        for round_ in range(args.rounds):
            for kind in KINDS if round_ % 2 == 0 else tuple(reversed(KINDS)):
                for name, pattern, block, depth, unit in WORKLOADS:
                    result = measure(vm, summary["disks"][kind], pattern, block, depth,
                                     args.seconds)
                    results[kind][name].append(result)
                    say(f"  round {round_ + 1} {kind:15} {name:22} {result[unit]:>9} "
                        f"{'MB/s' if unit == 'mb_s' else 'IOPS'}")
        say("\n".join(["", f"medians of {args.rounds} round(s), {args.seconds:g} s each, "
                           f"{vm.accel}:"] + table(results)))
        if args.json:
            args.json.write_text(json.dumps({"accel": vm.accel, "summary": summary,
                                             "seconds": args.seconds, "results": results},
                                            indent=1))
        return 0
    finally:
        try:  # a guest logged in to itself hangs in shutdown otherwise
            vm.agent.run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False)
        except (AgentError, OSError):
            pass  # not booted: nothing logged in
        say(f"power-off: {vm.poweroff()}")


if __name__ == "__main__":
    sys.exit(main())
