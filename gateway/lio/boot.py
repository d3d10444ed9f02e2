"""Boot: rtslib's saved configuration for everything else, lio.toml for the gateway's objects.

targetcli's ``saveconfig`` (and its save on exit) dumps all of LIO into
``/etc/rtslib-fb-target/saveconfig.json``, the gateway's targets and CHAP
secrets included (rtslib writes it 0600).  Restored as it is at boot, it
would bring the gateway's targets back as they were when last saved, enabled,
before the gateway could apply lio.toml.  So at boot the gateway restores a
copy of that file *without* its own objects, then applies lio.toml, whose
TPGs it enables last: an initiator never meets a stale ACL or secret.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .state import Ownership

SAVECONFIG = Path("/etc/rtslib-fb-target/saveconfig.json")


def filter_saveconfig(doc: dict[str, Any], owned: Ownership) -> dict[str, Any]:
    """``doc`` (an rtslib dump) without what the gateway owns: its iSCSI targets, its
    ``user`` backstores (unless a remaining target uses them), and discovery auth."""
    out = copy.deepcopy(doc)
    out["targets"] = [t for t in doc.get("targets", [])
                      if not (t.get("fabric") == "iscsi" and t.get("wwn") in owned.targets)]
    used = {lun.get("storage_object") for t in out["targets"] for tpg in t.get("tpgs", [])
            for lun in tpg.get("luns", [])}
    out["storage_objects"] = [
        so for so in doc.get("storage_objects", [])
        if not (so.get("plugin") == "user" and so.get("name") in owned.backstores
                and f"/backstores/user/{so['name']}" not in used)]
    if owned.discovery:
        out["fabric_modules"] = [fm for fm in doc.get("fabric_modules", [])
                                 if fm.get("name") != "iscsi"]
    return out


def restore_others(owned: Ownership, path: Path = SAVECONFIG) -> list[str]:
    """Clear LIO and restore ``path`` minus the gateway's objects; rtslib's errors."""
    from rtslib_fb import RTSRoot

    root = RTSRoot()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        root.clear_existing(confirm=True)
        return []
    return root.restore(filter_saveconfig(doc, owned), clear_existing=True,
                        abort_on_error=False)
