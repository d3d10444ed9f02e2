"""The TCMU handler natively: simulated kernel in one process, handler in another.

A child process plays the kernel (gateway.tcmu.simkernel: queues READ(16) /
WRITE(16) commands on a shared ring, keeps QUEUE-DEPTH of them in flight,
reaps completions) while this process runs the production handler stack
(RingDevice -> LogicalUnit -> Volume) on the same mapping.  Each workload is
compared with a plain loop over the same file in the same run: pread (+ XTS
decrypt) for reads, (XTS encrypt +) pwrite for writes, one request at a time.

Workloads: 4 KiB random read and write at queue depth 32; 1 MiB sequential
read and write at queue depth 8; on encrypted volumes with 512-byte sectors
and with 4096-byte ones ("4Kn": the LUN's blocks are 4 KiB too), and on a
plain volume.  Besides the rate, each row gives the rate per core of the
handler (commands over the CPU time this process spent: the simulated
kernel's own work is not in it) and, where the project sets one, the
target.  Each figure is the best of several rounds in which the handler and
the loop take turns, so that the machine's drift (other jobs on a shared
box) hits both alike.  Run from the repository root:
``python bench/tcmu.py [--seconds S] [--rounds R] [--workers N] [--pin-devices]
[--only TEXT]``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import format as fmt  # noqa: E402
from gateway.backstore import open_backstore  # noqa: E402
from gateway.crypto import SectorCipher  # noqa: E402
from gateway.scsi import Identity, Limits, LogicalUnit  # noqa: E402
from gateway.tcmu.device import RingDevice  # noqa: E402
from gateway.tcmu.doorbell import EventfdDoorbell  # noqa: E402
from gateway.tcmu.handler import least_used_cpu  # noqa: E402
from gateway.tcmu.simkernel import RingFull, SimKernel  # noqa: E402
from gateway.volume import Volume  # noqa: E402

SPAN = 256 << 20  # bytes of the volume the workloads touch (written first)
CMDR = 1 << 20  # ring size (the kernel default is 8 MiB - 128)
# (workload, what is compared, threshold): "ratio" to the plain loop, or "per core" rate
TARGETS = {
    "encrypted 1 MiB sequential read, QD8": ("ratio", 0.70),
    "encrypted 4 KiB random read, QD32": ("per core", 40_000),
    "plain 4 KiB random read, QD32": ("per core", 40_000),
}
# (row prefix, encrypted, sector size = the LUN's block size): evlu format's default 512,
# and 4096, where one cryptography call encrypts a 4 KiB block
VOLUMES = [("encrypted", True, 512), ("encrypted 4Kn", True, 4096), ("plain", False, 512)]


def _cdb(write: bool, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A if write else 0x88, 0, lba, blocks, 0, 0)


def producer(k: SimKernel, write: bool, size: int, depth: int, randomly: bool, seconds: float,
             block_size: int, out_fd: int) -> None:
    """The simulated kernel's side: keep ``depth`` commands in flight for ``seconds``."""
    rnd = random.Random(1)
    payload = os.urandom(size)
    slots = SPAN // size
    blocks = size // block_size
    position = 0
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline and not k.inflight:
            break
        while now < deadline and len(k.inflight) < depth:
            slot = rnd.randrange(slots) if randomly else position % slots
            position += 1
            try:
                k.queue(_cdb(write, slot * blocks, blocks), payload if write else b"",
                        0 if write else size)
            except RingFull:
                break
        k.wait(0.5)
        for c in k.reap(collect=False):
            if c.status:
                os.write(out_fd, f"error {c.status} {c.sense[:18].hex()}".encode())
                os._exit(1)
            done += 1
    elapsed = time.perf_counter() - start
    os.write(out_fd, f"{done} {elapsed}".encode())
    os._exit(0)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process: the handler's threads
    return usage.ru_utime + usage.ru_stime


def served_run(volume: Volume, write: bool, size: int, depth: int, randomly: bool,
               seconds: float, workers: int,
               cpus: set[int] | None = None) -> tuple[float, float]:
    """Operations per second through the simulated kernel and the real handler, and
    operations per CPU second of the handler."""
    k = SimKernel(cmdr_size=CMDR, data_size=max(64 << 20, 2 * depth * size), canaries=False)
    m = mmap.mmap(k.memfd, k.size)
    lu = LogicalUnit(volume, Identity(serial="bench"),
                     Limits(max_transfer_blocks=(1 << 20) // volume.block_size))
    dev = RingDevice(memoryview(m), EventfdDoorbell(k.to_handler, k.to_kernel), lu,
                     workers=workers, name="bench", cpus=cpus).start()
    r, w = os.pipe()
    cpu = _cpu_seconds()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        producer(k, write, size, depth, randomly, seconds, volume.block_size, w)
    os.close(w)
    result = b""
    while chunk := os.read(r, 4096):
        result += chunk
    os.close(r)
    os.waitpid(pid, 0)
    dev.stop()
    cpu = _cpu_seconds() - cpu
    k.close()
    fields = result.decode().split()
    if fields[0] == "error":
        raise SystemExit(f"command failed: {result.decode()}")
    return int(fields[0]) / float(fields[1]), int(fields[0]) / cpu


def loop_run(path: str, cipher: SectorCipher | None, offset: int, write: bool, size: int,
             randomly: bool, seconds: float) -> float:
    """The baseline: one pread(+decrypt) or (encrypt+)pwrite at a time, same file."""
    fd = os.open(path, os.O_RDWR)
    buf = bytearray(os.urandom(size))
    rnd = random.Random(2)
    slots = SPAN // size
    count = 0
    position = 0
    start = time.perf_counter()
    deadline = start + seconds
    try:
        while time.perf_counter() < deadline:
            slot = rnd.randrange(slots) if randomly else position % slots
            position += 1
            where = offset + slot * size
            sector = slot * size // cipher.sector_size if cipher else 0
            if write:
                if cipher is not None:
                    cipher.encrypt_into(buf, sector)
                os.pwrite(fd, buf, where)
            else:
                os.preadv(fd, [buf], where)
                if cipher is not None:
                    cipher.decrypt_into(buf, sector)
            count += 1
    finally:
        os.close(fd)
    return count / (time.perf_counter() - start)


def _verdict(name: str, ratio: float, per_core: float) -> str:
    """The row's target and whether this run met it ("" when none is set)."""
    target = TARGETS.get(name.replace(" 4Kn ", " "))
    if target is None:
        return ""
    what, threshold = target
    value = ratio if what == "ratio" else per_core
    wanted = f">= {threshold:.2f}" if what == "ratio" else f">= {threshold / 1000:,.0f}k/core"
    return f"{wanted} {'met' if value >= threshold else 'NOT met'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="per workload and contender, split over the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="turns each contender takes")
    # gatewayd's default.  Short reads of cached data run in the ring thread anyway
    # (a hand-off costs more than they do); 0 runs every command there.
    parser.add_argument("--workers", type=int, default=4,
                        help="handler I/O threads per device (default: %(default)s, as "
                             "gatewayd; 0: the ring thread runs every command)")
    parser.add_argument("--pin-devices", dest="pin", action="store_true",
                        help="run the handler's threads on one CPU (gatewayd "
                             "--pin-devices)")
    parser.add_argument("--only", default="", help="run the workloads whose name has this")
    args = parser.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    cpus = {least_used_cpu(allowed, [])} if args.pin and len(allowed) > 1 else None
    workloads = [("4 KiB random read, QD32", False, 4096, 32, True),
                 ("4 KiB random write, QD32", True, 4096, 32, True),
                 ("1 MiB sequential read, QD8", False, 1 << 20, 8, False),
                 ("1 MiB sequential write, QD8", True, 1 << 20, 8, False)]
    with tempfile.TemporaryDirectory(prefix="evlu-bench-tcmu-") as tmp:
        rows = []
        for kind, encrypted, sector_size in VOLUMES:
            chosen = [w for w in workloads if args.only in f"{kind} {w[0]}"]
            if not chosen:
                continue
            path = os.path.join(tmp, f"{kind}.img")
            with open(path, "wb") as f:
                f.truncate(fmt.DEFAULT_DATA_OFFSET + SPAN)
            dev = open_backstore(path)
            kek = os.urandom(32)
            if encrypted:
                fmt.create(dev, kek, fmt.Binding("bench", "bench"), sector_size=sector_size)
            volume = Volume.open(dev, allow_plain=not encrypted)
            if encrypted:
                volume.offer_kek("bench", kek)
            step = (1 << 20) // volume.block_size
            for lba in range(0, SPAN // volume.block_size, step):  # real data (no hole shortcuts)
                volume.write(lba, os.urandom(1 << 20))
            volume.flush()
            cipher = None
            if encrypted:
                header = fmt.read(dev).header
                dek = fmt.unlock(dev, header, kek)
                cipher = SectorCipher(dek, header.metadata.data_segment.sector_size)
            offset = volume.data_offset
            turn = args.seconds / args.rounds
            for name, write, size, depth, randomly in chosen:
                ours = per_core = base = 0.0
                for _ in range(args.rounds):
                    rate, core_rate = served_run(volume, write, size, depth, randomly, turn,
                                                 args.workers, cpus)
                    ours, per_core = max(ours, rate), max(per_core, core_rate)
                    base = max(base, loop_run(path, cipher, offset, write, size, randomly, turn))
                rows.append((f"{kind} {name}", size, ours, per_core, base))
            volume.close()
    print(f"TCMU handler on the simulated kernel vs a plain loop over the same file "
          f"(best of {args.rounds} turns of {args.seconds / args.rounds:g} s, {args.workers} "
          f"workers, {'on CPU %d' % min(cpus) if cpus else 'on any CPU'}; per core: over the "
          "handler's CPU time)")
    print(f"{'workload':<42} {'handler':>13} {'per core':>13} {'loop':>13} {'ratio':>6}  target")
    for name, size, ours, per_core, base in rows:
        unit = (lambda v: f"{v:,.0f} IOPS") if size < (1 << 20) else \
            (lambda v: f"{v * size / 1e6:,.0f} MB/s")
        print(f"{name:<42} {unit(ours):>13} {unit(per_core):>13} {unit(base):>13} "
              f"{ours / base:6.2f}  {_verdict(name, ours / base, per_core)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
