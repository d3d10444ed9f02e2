"""The ``user:evlu`` configuration string: which backing store a device serves.

``PATH[;plain]`` — the eVLU's backing file or block device; ``;plain`` lets a
store without a LUKS2 header be served unencrypted.  The cfgstring is
world-readable in sysfs and saved by targetcli: it holds a path, never a key.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .. import format as fmt
from ..backstore import BackstoreError, open_backstore

SUBTYPE = "evlu"
CONFIG_DESC = ("PATH[;plain]: the eVLU backing file or block device (made with 'evlu "
               "format'); ';plain' serves a store without an eVLU header unencrypted")
MAX_CFGSTRING = 255


@dataclass(frozen=True)
class DeviceConfig:
    path: str
    allow_plain: bool = False


def parse(cfgstring: str) -> DeviceConfig:
    """Parse ``PATH[;plain]`` (also accepted with the ``evlu/`` subtype prefix)."""
    if cfgstring.startswith(SUBTYPE + "/"):
        cfgstring = cfgstring[len(SUBTYPE) + 1:]
    if len(cfgstring) > MAX_CFGSTRING:
        raise ValueError(f"configuration longer than {MAX_CFGSTRING} bytes")
    path, *options = cfgstring.split(";")
    unknown = [o for o in options if o != "plain"]
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; only 'plain' is known")
    if not path.startswith("/"):
        raise ValueError(f"the backing store must be an absolute path, not {path!r}")
    if any(c in path for c in ",\n:"):
        raise ValueError("the path may not contain ',', ':' or a newline (the kernel and "
                         "rtslib split on them)")
    return DeviceConfig(path, "plain" in options)


def check(cfgstring: str) -> tuple[bool, str]:
    """targetcli's CheckConfig: can this configuration be served, and what is it?"""
    try:
        config = parse(cfgstring)
        mode = os.stat(config.path).st_mode
    except ValueError as exc:
        return False, str(exc)
    except OSError as exc:
        return False, f"{exc.filename}: {exc.strerror}"
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        return False, f"{config.path} is neither a regular file nor a block device"
    try:
        dev = open_backstore(config.path, readonly=True)
    except BackstoreError as exc:
        return False, str(exc)
    try:
        header = fmt.read(dev).header
    except fmt.NoHeaderError:
        if config.allow_plain:
            return True, f"{config.path}: no eVLU header; served unencrypted (plain)"
        return False, (f"{config.path} has no eVLU header: run 'evlu format {config.path}' "
                       "first, or add ';plain' to serve it unencrypted")
    except (fmt.FormatError, BackstoreError) as exc:
        return False, f"{config.path}: eVLU header unusable: {exc}"
    finally:
        dev.close()
    keys = ", ".join(f"{t.key_id} ({t.kms})" for t in header.metadata.evlu_tokens()) or "none"
    return True, f"{config.path}: eVLU {header.uuid}, key id(s) {keys}"
