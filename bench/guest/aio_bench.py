"""Guest side of bench/appliance_tcmu.py: O_DIRECT I/O on a block device at a queue depth.

Run in the appliance as ``python3 - DEVICE PATTERN BLOCK DEPTH SECONDS`` (sent over
the agent). PATTERN is seqwrite, seqread, randwrite or randread; random offsets
are uniform over the device, aligned to BLOCK; sequential I/O wraps at the end.
One thread keeps DEPTH requests in flight with Linux native AIO (io_submit /
io_getevents through ctypes: no per-request thread, little Python per request),
so the initiator costs the guest's CPUs as little as we can make it.  Prints
one JSON line: ios, bytes, seconds, iops, mb_s.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import struct
import sys
import time

# x86-64 system call numbers and the uapi layout of struct iocb / io_event
SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = 206, 207, 208, 209
IOCB_CMD_PREAD, IOCB_CMD_PWRITE = 0, 1
_IOCB = struct.Struct("=QIiHhIQQqQII")  # 64 bytes
_EVENT = struct.Struct("=QQqq")  # 32 bytes

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _sys(number: int, *args: object) -> int:
    ret = libc.syscall(number, *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def run(device: str, pattern: str, block: int, depth: int, seconds: float) -> dict:
    write = pattern.endswith("write")
    fd = os.open(device, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    size = os.lseek(fd, 0, os.SEEK_END) // block * block
    buffers = mmap.mmap(-1, block * depth)  # page-aligned, as O_DIRECT wants
    if write:
        buffers.write(os.urandom(block * depth))
    anchor = ctypes.c_char.from_buffer(buffers)
    base = ctypes.addressof(anchor)
    iocbs = ctypes.create_string_buffer(_IOCB.size * depth)
    pointers = (ctypes.c_void_p * depth)()
    events = ctypes.create_string_buffer(_EVENT.size * depth)
    ctx = ctypes.c_ulong(0)
    _sys(SYS_IO_SETUP, depth, ctypes.byref(ctx))
    rng = random.Random(1)
    blocks = size // block
    cursor = 0
    opcode = IOCB_CMD_PWRITE if write else IOCB_CMD_PREAD

    def prepare(slot: int) -> None:
        nonlocal cursor
        if pattern.startswith("rand"):
            offset = rng.randrange(blocks) * block
        else:
            offset, cursor = cursor, (cursor + block) % size
        _IOCB.pack_into(iocbs, slot * _IOCB.size, slot, 0, 0, opcode, 0, fd,
                        base + slot * block, block, offset, 0, 0, 0)
        pointers[0] = ctypes.addressof(iocbs) + slot * _IOCB.size

    ios = 0
    try:
        for slot in range(depth):
            prepare(slot)
            _sys(SYS_IO_SUBMIT, ctx, 1, pointers)
        start = time.monotonic()
        deadline = start + seconds
        now = start
        while now < deadline:
            done = _sys(SYS_IO_GETEVENTS, ctx, 1, depth, events, None)
            now = time.monotonic()
            for i in range(done):
                slot, _obj, res, _res2 = _EVENT.unpack_from(events, i * _EVENT.size)
                if res != block:
                    raise OSError(f"{pattern} of {block} bytes at depth {depth} returned {res}")
                ios += 1
                if now < deadline:
                    prepare(slot)
                    _sys(SYS_IO_SUBMIT, ctx, 1, pointers)
        elapsed = now - start
    finally:
        _sys(SYS_IO_DESTROY, ctx)  # waits for what is still in flight (not counted)
        os.close(fd)
        del anchor
        buffers.close()
    return {"ios": ios, "bytes": ios * block, "seconds": round(elapsed, 3),
            "iops": round(ios / elapsed, 1), "mb_s": round(ios * block / elapsed / 1e6, 2)}


if __name__ == "__main__":
    dev, pat, bs, qd, secs = sys.argv[1:6]
    print(json.dumps(run(dev, pat, int(bs), int(qd), float(secs))))
