"""Throughput of gateway.crypto.SectorCipher against plain cryptography XTS calls.

For each buffer size, sector size and direction it measures, in one run:

* SectorCipher ``encrypt``/``decrypt`` (new bytes) and ``encrypt_into``/``decrypt_into``;
* the per-sector baseline: one ``Cipher(AES(key), XTS(tweak))`` call per sector;
* the ceiling: one XTS call over the whole buffer (``update_into``, no allocation).

Each figure is the best of several rounds; the candidates take turns within a
round so that drift in the machine's speed hits them alike.  Run from the
repository root: ``python bench/xts.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from gateway.crypto import SectorCipher  # noqa: E402

SIZES = (4 * 1024, 64 * 1024, 1024 * 1024)
SECTOR_SIZES = (512, 4096)
FIRST_SECTOR = 123456


def per_sector(key: bytes, sector_size: int, encrypt: bool) -> Callable[[bytes, bytearray], None]:
    """One cryptography XTS call per sector, plain64 IVs (the naive implementation)."""
    algorithm = algorithms.AES(key)
    step = sector_size // 512

    def run(data: bytes, out: bytearray) -> None:
        for offset in range(0, len(data), sector_size):
            iv = (FIRST_SECTOR + offset // sector_size) * step
            cipher = Cipher(algorithm, modes.XTS(iv.to_bytes(16, "little")))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out[offset:offset + sector_size] = ctx.update(data[offset:offset + sector_size])

    return run


def one_call(key: bytes, encrypt: bool) -> Callable[[bytes, bytearray], None]:
    """One XTS call over the whole buffer: not sector-correct, the speed ceiling."""
    algorithm = algorithms.AES(key)

    def run(data: bytes, out: bytearray) -> None:
        cipher = Cipher(algorithm, modes.XTS(FIRST_SECTOR.to_bytes(16, "little")))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        ctx.update_into(data, out)

    return run


def best_rates(candidates: dict[str, Callable[[], object]], size: int, rounds: int,
               round_seconds: float) -> dict[str, float]:
    """Best MB/s of each candidate over ``rounds`` rounds, taking turns."""
    calls = {}
    for name, fn in candidates.items():  # calibrate: calls per round
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < round_seconds / 4:
            fn()
            n += 1
        calls[name] = max(1, round(n * round_seconds / (time.perf_counter() - start)))
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name])
    return {name: size / seconds / 1e6 for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 7, quick 3)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    round_seconds = 0.02 if args.quick else 0.1

    key = os.urandom(64)
    header = (f"{'size':>6} {'sector':>6} {'op':>7} | {'SectorCipher':>12} {'_into':>8} "
              f"{'per-sector':>10} {'one-call':>9} | {'SC/one-call':>11} {'_into/one-call':>14} "
              f"{'SC/per-sector':>13}")
    print(f"MB/s, best of {rounds} rounds.  SectorCipher: encrypt()/decrypt(), new bytes;"
          " _into: encrypt_into()/decrypt_into(), in place")
    print(header)
    print("-" * len(header))
    for size in SIZES:
        data = os.urandom(size)
        out = bytearray(size + 16)
        buf = bytearray(data)
        for sector_size in SECTOR_SIZES:
            cipher = SectorCipher(key, sector_size)
            for op, encrypt in (("encrypt", True), ("decrypt", False)):
                crypt = cipher.encrypt if encrypt else cipher.decrypt
                crypt_into = cipher.encrypt_into if encrypt else cipher.decrypt_into
                baseline, ceiling = per_sector(key, sector_size, encrypt), one_call(key, encrypt)
                rates = best_rates({
                    "sc": lambda: crypt(data, FIRST_SECTOR),
                    "into": lambda: crypt_into(buf, FIRST_SECTOR),
                    "per-sector": lambda: baseline(data, out),
                    "one-call": lambda: ceiling(data, out),
                }, size, rounds, round_seconds)
                print(f"{size // 1024:>5}K {sector_size:>6} {op:>7} | {rates['sc']:>12.0f} "
                      f"{rates['into']:>8.0f} {rates['per-sector']:>10.0f} "
                      f"{rates['one-call']:>9.0f} | {rates['sc'] / rates['one-call']:>11.2f} "
                      f"{rates['into'] / rates['one-call']:>14.2f} "
                      f"{rates['sc'] / rates['per-sector']:>13.2f}")
            cipher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
