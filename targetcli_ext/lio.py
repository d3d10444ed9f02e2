"""Which LIO LUNs export each eVLU (read from configfs through rtslib, as targetcli does)."""

from __future__ import annotations

import os

from rtslib_fb import RTSRoot

from gateway.tcmu import cfgstring


def exports(rtsroot: RTSRoot) -> dict[str, list[str]]:
    """Backing-store real path -> ``IQN/tpgN/lunM`` of every LUN of a ``user:evlu`` backstore."""
    found: dict[str, list[str]] = {}
    for so in rtsroot.storage_objects:
        if so.plugin != "user" or not so.config.startswith(f"{cfgstring.SUBTYPE}/"):
            continue
        try:
            path = os.path.realpath(cfgstring.parse(so.config).path)
        except ValueError:  # not one of ours to serve: the handler refuses it too
            continue
        found.setdefault(path, []).extend(
            f"{lun.parent_tpg.parent_target.wwn}/tpg{lun.parent_tpg.tag}/lun{lun.lun}"
            for lun in so.attached_luns)
    return found
