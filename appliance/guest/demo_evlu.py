"""Guest side of ``make run``: the embedded KMS, one eVLU, lio.toml, gatewayd (one process).

Run in the appliance as ``python3 FILE --iqn IQN --initiator IQN --path P --size N``
after the host wrote ``/etc/evlu-gateway/chap.toml`` (credential ``demo``).  The KMS
is set up only when the appliance has none (``evlu kms init``, ``enroll appliance``);
the eVLU is formatted only when its file does not exist.  Returns once gatewayd
serves it unlocked; prints a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from gateway import format as fmt
from gateway.backstore import open_backstore
from gateway.cli.main import main as evlu
from gateway.daemon.client import call
from gateway.kms import Config

LIO_TOML = """# make run: the demo target (gatewayd applies it at start and at boot)
[discovery]
chap = "demo"

[[targets]]
iqn = "{iqn}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "{path}" }}]
acls = [{{ initiator = "{initiator}", chap = "demo", mapped_luns = [{{ lun = 0 }}] }}]
"""
GATEWAYD_CONF = """# make run: gatewayd's options (python -m gateway.daemon --help)
metrics = "0.0.0.0:9100"
"""


def run(*argv: str) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        rc = evlu(list(argv))
    if rc != 0:
        raise SystemExit(f"evlu {' '.join(argv)}: exit {rc}")


def kms(config: Config) -> None:
    if not (config.kms_dir / "server.conf").exists():
        run("kms", "init")
        run("kms", "enroll", "appliance")
    subprocess.run(["systemctl", "start", "evlu-kms"], check=True)
    deadline = time.monotonic() + 300
    while True:
        with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(sys.stderr):
            if evlu(["kms", "status"]) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit("the embedded KMS did not answer within 300 s")
        time.sleep(1)


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--iqn", "--initiator", "--path"):
        p.add_argument(name, required=True)
    p.add_argument("--size", type=int, required=True)
    args = p.parse_args()
    start = time.monotonic()
    config = Config()
    kms(config)
    if not os.path.exists(args.path):
        os.makedirs(os.path.dirname(args.path), exist_ok=True)
        with open(args.path, "wb") as f:
            f.truncate(args.size)
        run("format", args.path, "--kms", "-q", "--yes")
    (config.root / "lio.toml").write_text(LIO_TOML.format(**vars(args)))
    (config.root / "gatewayd.conf").write_text(GATEWAYD_CONF)
    subprocess.run(["systemctl", "restart", "evlu-gatewayd"], check=True)  # returns at READY
    deadline = time.monotonic() + 300
    while (state := call("lun.info", {"lun": args.path})["state"]) != "ENCRYPTED":
        if time.monotonic() > deadline:
            raise SystemExit(f"{args.path} is {state} after 300 s: 'evlu lun info' says why")
        time.sleep(1)
    dev = open_backstore(args.path, readonly=True)
    try:
        header = fmt.read(dev).header
        segment = header.metadata.data_segment
        summary = {"uuid": header.uuid, "key_id": header.metadata.evlu_tokens()[0].key_id,
                   "size": dev.size, "capacity": dev.size - segment.offset}
    finally:
        dev.close()
    print(json.dumps(summary | {"seconds": round(time.monotonic() - start, 1)}))


if __name__ == "__main__":
    main()
