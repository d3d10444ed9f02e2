"""Guest side: an LIO fileio LUN behind an iSCSI target, with rtslib-fb (one process).

Run in the appliance as `python3 - ARGS` (appliance/demo.py sends it): demo
mode (generate_node_acls, no authentication), portal 0.0.0.0:3260, LUN 0,
thin provisioning (UNMAP) enabled. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

from rtslib_fb import LUN, TPG, FabricModule, FileIOStorageObject, NetworkPortal, Target


def create(iqn: str, name: str, path: str, size: int) -> dict:
    start = time.monotonic()
    storage = FileIOStorageObject(name, dev=path, size=size, write_back=False)
    storage.set_attribute("emulate_tpu", "1")
    storage.set_attribute("emulate_tpws", "1")
    tpg = TPG(Target(FabricModule("iscsi"), wwn=iqn), 1)
    for attribute, value in (("authentication", "0"), ("generate_node_acls", "1"),
                             ("cache_dynamic_acls", "1"), ("demo_mode_write_protect", "0")):
        tpg.set_attribute(attribute, value)
    NetworkPortal(tpg, "0.0.0.0", 3260)
    LUN(tpg, 0, storage)
    tpg.enable = True
    return {"iqn": iqn, "lun": 0, "backstore": f"fileio/{name}", "file": path, "size": size,
            "seconds": round(time.monotonic() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iqn", required=True)
    parser.add_argument("--name", default="lun0")
    parser.add_argument("--file", required=True)
    parser.add_argument("--size", type=int, required=True, help="bytes")
    args = parser.parse_args()
    print(json.dumps(create(args.iqn, args.name, args.file, args.size)))


if __name__ == "__main__":
    main()
