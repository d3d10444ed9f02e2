"""Guest side of tests/vm/test_tcmu.py: user:evlu LUNs behind an iSCSI target (rtslib-fb).

Run in the appliance as ``python3 - create NAME=PATH...`` (sent over the agent):
every LUN is a ``user:evlu`` TCMU backstore whose cfgstring is the eVLU's path,
created with ``nl_reply_supported=-1``, its size = the eVLU's data segment and
its block size = the eVLU's sector size;
LUN n of one demo-mode target is the n-th argument.  ``python3 - export NAME...``
adds LUNs for existing storage objects (made with targetcli) instead.  Prints a
JSON summary.
"""

from __future__ import annotations

import json
import sys
import time

from rtslib_fb import LUN, TPG, FabricModule, NetworkPortal, RTSRoot, Target, \
    UserBackedStorageObject

from gateway import format as fmt
from gateway.backstore import open_backstore

IQN = "iqn.2003-01.org.linux-iscsi.evlu-appliance:evlu"


def data_segment(path: str) -> tuple[int, int]:
    """The eVLU's data size and sector size (the LUN's block size)."""
    dev = open_backstore(path, readonly=True)
    try:
        seg = fmt.read(dev).header.metadata.data_segment
        return (dev.size - seg.offset) // seg.sector_size * seg.sector_size, seg.sector_size
    finally:
        dev.close()


def target(root: RTSRoot) -> TPG:
    """TPG 1 of the test target, made on first use (demo mode, no authentication)."""
    tpg = next((t for t in root.tpgs if t.parent_target.wwn == IQN), None)
    if tpg is None:
        tpg = TPG(Target(FabricModule("iscsi"), wwn=IQN), 1)
        for attribute, value in (("authentication", "0"), ("generate_node_acls", "1"),
                                 ("cache_dynamic_acls", "1"), ("demo_mode_write_protect", "0")):
            tpg.set_attribute(attribute, value)
        NetworkPortal(tpg, "0.0.0.0", 3260)
        tpg.enable = True
    return tpg


def export(names: list[str]) -> dict:
    root = RTSRoot()
    tpg = target(root)
    luns = {}
    for so in root.storage_objects:
        if so.name in names:
            luns[so.name] = {"lun": LUN(tpg, storage_object=so).lun, "size": so.size}
    return {"iqn": IQN, "luns": luns}


def create(specs: list[str]) -> dict:
    start = time.monotonic()
    tpg = target(RTSRoot())
    luns = {}
    for spec in specs:
        name, path = spec.split("=", 1)
        size, block_size = data_segment(path)
        # hw_max_sectors as LIO's fileio/iblock (8 MiB of 512-byte sectors): the handler
        # advertises and enforces min(hw_max_sectors, the ring's data area).
        so = UserBackedStorageObject(
            name, config=f"evlu/{path}", size=size, hw_max_sectors=16384 * 512 // block_size,
            control=f"nl_reply_supported=-1,hw_block_size={block_size}")
        lun = LUN(tpg, storage_object=so)
        luns[name] = {"lun": lun.lun, "size": size, "path": path, "block_size": block_size,
                      "serial": so.wwn}
    return {"iqn": IQN, "luns": luns, "seconds": round(time.monotonic() - start, 2)}


if __name__ == "__main__":
    print(json.dumps({"create": create, "export": export}[sys.argv[1]](sys.argv[2:])))
