"""Guest side of bench/appliance_tcmu.py: five LUNs of one size behind one iSCSI target.

Run in the appliance as ``python3 - EVLU_PATH RAW_PATH FILEIO_PATH PLAIN_PATH EVLU4K_PATH``
(sent over the agent), with the eVLUs formatted and tcmu-runner and ``evlu tcmu
serve`` running:

* LUN 0 ``user:evlu``: our handler; the eVLU's data segment sets the size;
* LUN 1 ``user:qcow``: tcmu-runner's qcow handler over RAW_PATH, a raw file of
  that size (the handler serves a file without a qcow header as raw, and only
  if its size equals the device's);
* LUN 2 ``fileio``: LIO's in-kernel file backstore over FILEIO_PATH (buffered);
* LUN 3 ``user:evlu plain``: our handler over PLAIN_PATH, a file without an eVLU
  header served unencrypted (``;plain``): the same path as LUN 0 but for XTS;
* LUN 4 ``user:evlu 4Kn``: our handler over EVLU4K_PATH, an eVLU of 4096-byte
  sectors (``evlu format --sector-size 4096``) served with 4096-byte blocks.

The user backstores take commands of up to 1 MiB (``hw_max_sectors``); ours get
``nl_reply_supported=-1``, tcmu-runner's keeps the reply mode tcmu-runner
asked for.  All four cache writes: fileio is created write-back, tcmu-runner's
qcow handler always reports WCE=1 (and never syncs a write), and ours get
``emulate_write_cache=1`` (with WCE=0 they would fdatasync every write, as they
promise).  Prints a JSON summary.
"""

from __future__ import annotations

import json
import os
import sys

from rtslib_fb import LUN, TPG, FabricModule, FileIOStorageObject, NetworkPortal, Target, \
    UserBackedStorageObject

from gateway import format as fmt
from gateway.backstore import open_backstore

IQN = "iqn.2003-01.org.linux-iscsi.evlu-appliance:bench"
MAX_BYTES = 1 << 20  # per command


def data_size(path: str) -> int:
    dev = open_backstore(path, readonly=True)
    try:
        seg = fmt.read(dev).header.metadata.data_segment
        return (dev.size - seg.offset) // seg.sector_size * seg.sector_size
    finally:
        dev.close()


def create(evlu: str, raw: str, fileio: str, plain: str, evlu4k: str) -> dict:
    size, size4k = data_size(evlu), data_size(evlu4k)
    if size4k != size:
        raise SystemExit(f"{evlu4k} holds {size4k} bytes of data, not {size}")
    for path in (raw, fileio, plain):
        with open(path, "wb") as f:
            f.truncate(size)
    objects = {
        "user:evlu": UserBackedStorageObject("bench_evlu", config=f"evlu/{evlu}", size=size,
                                             hw_max_sectors=MAX_BYTES // 512,
                                             control="nl_reply_supported=-1"),
        "user:qcow": UserBackedStorageObject("bench_qcow", config=f"qcow/{raw}", size=size,
                                             hw_max_sectors=MAX_BYTES // 512),
        "fileio": FileIOStorageObject("bench_fileio", fileio, size=size, write_back=True),
        "user:evlu plain": UserBackedStorageObject("bench_plain", config=f"evlu/{plain};plain",
                                                   size=size, hw_max_sectors=MAX_BYTES // 512,
                                                   control="nl_reply_supported=-1"),
        "user:evlu 4Kn": UserBackedStorageObject(
            "bench_evlu4k", config=f"evlu/{evlu4k}", size=size, hw_max_sectors=MAX_BYTES // 4096,
            control="nl_reply_supported=-1,hw_block_size=4096"),
    }
    # after enable (rtslib enables a user backstore as it creates it): the running
    # handler gets the change as a RECONFIG event
    for kind in ("user:evlu", "user:evlu plain", "user:evlu 4Kn"):
        objects[kind].set_attribute("emulate_write_cache", "1")
    tpg = TPG(Target(FabricModule("iscsi"), wwn=IQN), 1)
    for attribute, value in (("authentication", "0"), ("generate_node_acls", "1"),
                             ("cache_dynamic_acls", "1"), ("demo_mode_write_protect", "0")):
        tpg.set_attribute(attribute, value)
    NetworkPortal(tpg, "0.0.0.0", 3260)
    tpg.enable = True
    luns = {kind: LUN(tpg, storage_object=so).lun for kind, so in objects.items()}
    return {"iqn": IQN, "size": size, "luns": luns, "cpus": os.cpu_count()}


if __name__ == "__main__":
    print(json.dumps(create(*sys.argv[1:6])))
