"""Guest side of tests/vm/test_e2e.py: many steps in one Python process (each start costs
seconds under TCG).  Also imported by the host test for :func:`block`.

``python3 e2e.py evlu`` runs the ``evlu`` command lines of a JSON list on stdin in this
process (``gateway.cli.main.main``, what the ``evlu`` entry point runs) and prints their
exit codes and output as JSON.  ``writer DEV OFFSET COUNT LOG STOP`` writes numbered
4 KiB blocks with O_DIRECT|O_DSYNC and logs each acknowledged one; ``verify DEV OFFSET
LOG`` reads the acknowledged blocks back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Iterable

BLOCK = 4096


def block(i: int) -> bytes:
    """Block ``i`` of the writer: its number and a checksum of it, repeated to 4 KiB."""
    unit = struct.pack("<Q", i) + hashlib.sha256(b"evlu-e2e:%d" % i).digest()[:24]
    return unit * (BLOCK // len(unit))


def acknowledged(lines: Iterable[str]) -> tuple[list[int], list[str]]:
    """(blocks acknowledged, failed writes) from the lines of a writer log."""
    acked, failed = [], []
    for line in lines:
        if line.startswith("E "):
            failed.append(line.strip())
        elif line.strip():
            acked.append(int(line.split()[0]))
    return acked, failed


def damaged(data: bytes | mmap.mmap, acked: list[int]) -> list[int]:
    """The acknowledged blocks that ``data`` (the writer's region from block 0) lacks."""
    return [i for i in acked if data[i * BLOCK:(i + 1) * BLOCK] != block(i)]


def run_evlu() -> None:
    from gateway.cli.main import main
    results = []
    for argv in json.load(sys.stdin):
        out, err = io.StringIO(), io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 2
        results.append({"argv": argv, "rc": rc, "stdout": out.getvalue(),
                        "stderr": err.getvalue(), "seconds": round(time.monotonic() - start, 1)})
    print(json.dumps(results))


def writer(dev: str, offset: int, count: int, log: str, stop: str) -> None:
    """Write blocks 0..count-1 at ``offset`` in order until ``stop`` exists; a line per
    acknowledged write (``i time``), ``E i errno`` per failed one (then go on)."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    with open(log, "a", buffering=1) as out:
        for i in range(count):
            if os.path.exists(stop):
                break
            buf[:] = block(i)
            try:
                os.pwrite(fd, buf, offset + i * BLOCK)
            except OSError as exc:
                out.write(f"E {i} {errno.errorcode.get(exc.errno, exc.errno)}\n")
                time.sleep(0.2)
                continue
            out.write(f"{i} {time.monotonic():.3f}\n")
    os.close(fd)


def verify(dev: str, offset: int, log: str) -> None:
    """Read the region back (O_DIRECT, 1 MiB at a time) and check every acknowledged block."""
    with open(log) as f:
        acked, failed = acknowledged(f)
    size = (max(acked, default=-1) + 1) * BLOCK
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    data = mmap.mmap(-1, max(size, BLOCK))
    chunk = 1 << 20
    for start in range(0, size, chunk):
        view = memoryview(data)[start:min(size, start + chunk)]
        os.preadv(fd, [view], offset + start)
        view.release()
    os.close(fd)
    print(json.dumps({"acked": len(acked), "failed": failed, "bad": damaged(data, acked)}))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "evlu":
        run_evlu()
    elif command == "writer":
        writer(args[0], int(args[1]), int(args[2]), args[3], args[4])
    elif command == "verify":
        verify(args[0], int(args[1]), args[2])
    else:
        sys.exit(f"unknown command {command!r}")
