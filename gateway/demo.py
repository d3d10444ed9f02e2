"""Native demo (``make run`` until the appliance exists): one file-backed eVLU.

Creates a sparse backing file and a KEK file under ``./demo``, formats an
eVLU, writes and reads data through the volume API, shows that the file holds
only ciphertext, and lets the real ``cryptsetup`` read the header and accept
the KEK.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from . import format as fmt
from .backstore import open_backstore
from .volume import State, Volume

MESSAGE = b"evlu demo: this sentence is stored encrypted. " * 11  # 517 bytes


def _step(text: str) -> None:
    print(f"\n== {text}")


def _run(cmd: list[str]) -> int:
    print("$ " + " ".join(cmd))
    sys.stdout.flush()
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__)
    parser.add_argument("--dir", default="demo", help="working directory (default: %(default)s)")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    image, kek_file = os.path.join(args.dir, "lun0.img"), os.path.join(args.dir, "kek.bin")

    _step("a 64 MiB sparse backing file and a 256-bit KEK (stand-in for the KMIP key)")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    kek = os.urandom(32)
    fd = os.open(kek_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(kek)
    print(f"{image}: 64 MiB, {kek_file}: 32 bytes, mode 0600")

    _step("format it as an eVLU (LUKS2 header, keyslot wrapped under the KEK, evlu-kmip token)")
    with open_backstore(image) as dev:
        header, dek = fmt.create(dev, kek, fmt.Binding("demo-key-0001", "default"))
        dek[:] = bytes(len(dek))
    seg = header.metadata.data_segment
    print(f"UUID {header.uuid}, data offset {seg.offset}, sector size {seg.sector_size}")

    _step("open it: the volume waits for its key, gets it, and serves plaintext")
    with open_backstore(image) as dev:
        vol = Volume.open(dev)
        print(f"state after open: {vol.state.value} ({vol.reason})")
        vol.offer_kek("demo-key-0001", kek)
        print(f"state after the KEK arrived: {vol.state.value}")
        assert vol.state == State.ENCRYPTED
        block = MESSAGE + bytes(-len(MESSAGE) % vol.block_size)
        vol.write(100, block, fua=True)
        back = bytes(vol.read(100, len(block) // vol.block_size))
        print(f"wrote {len(block)} bytes at LBA 100, read back identical: {back == block}")
        print(f"capacity seen by an initiator: {vol.num_blocks} blocks of {vol.block_size} bytes")
        vol.close()

    _step("the backing file holds only ciphertext")
    with open(image, "rb") as f:
        raw = f.read()
    at = seg.offset + 100 * seg.sector_size
    print(f"plaintext found in the file: {MESSAGE[:32] in raw}")
    print(f"bytes at the data offset + LBA 100: {raw[at:at + 32].hex()}")

    _step("evlu dump: both header copies, and the binding's key id")
    script = os.path.join(os.path.dirname(sys.executable), "evlu")  # the venv's console script
    evlu = [script] if os.path.exists(script) else [sys.executable, "-m", "gateway.cli.main"]
    _run([*evlu, "dump", image])

    if shutil.which("cryptsetup") is None:
        print("\ncryptsetup is not installed: run 'make run' (installs it) to see the interop part")
        return 1
    _step("stock cryptsetup reads the header and shows the evlu-kmip token")
    rc = _run(["cryptsetup", "luksDump", image])
    _step("cryptsetup accepts the KEK as the keyslot passphrase")
    rc |= _run(["cryptsetup", "open", "--test-passphrase", "--key-file", kek_file, image])
    print("KEK accepted" if rc == 0 else "cryptsetup refused")
    return rc


if __name__ == "__main__":
    sys.exit(main())
