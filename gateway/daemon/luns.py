"""The LUNs gatewayd knows: one volume per backing store, shared by every TCMU device on it.

A LUN enters the table when ``lun.add`` names its backing store or when LIO
creates a ``user:evlu`` device on it (the handler acquires its volume here),
and leaves when neither holds it any more.  Backing stores are keyed by their
real path, so ``/dev/vg/lv`` and ``/dev/dm-3`` are one LUN.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from .. import format as fmt
from ..backstore import BackstoreError, open_backstore
from ..tcmu.cfgstring import DeviceConfig
from ..volume import KeySource, State, Volume
from .control import Code, ControlError
from .metrics import LunMeter

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Lun:
    name: str
    path: str  # the real path of the backing store
    volume: Volume
    added: bool = False  # through lun.add: stays when no device serves it
    target: str | None = None
    devices: set[str] = field(default_factory=set)  # TCMU devices (so_names) serving it
    meter: LunMeter = field(default_factory=LunMeter)

    def info(self) -> dict[str, Any]:
        vol = self.volume
        header = vol.header
        return {
            "name": self.name, "path": self.path, "state": vol.state.value,
            "reason": vol.reason, "added": self.added, "target": self.target,
            "devices": sorted(self.devices), "block_size": vol.block_size,
            "blocks": vol.num_blocks, "size": vol.num_blocks * vol.block_size,
            "uuid": header.uuid if header else None,
            "seqid": header.seqid if header else None,
            "key_ids": [{"key_id": t.key_id, "kms": t.kms} for t in vol.bindings],
            "unlocked_by": vol.unlocked_by,
        }


def name_for(path: str) -> str:
    """A LUN name from a path: its base name without extension, in [A-Za-z0-9_.-]."""
    base = os.path.basename(path)
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    return "_".join(_NAME.findall(stem)) or "lun"


class LunTable:
    """The LUNs, by real path; the handler's :class:`~gateway.tcmu.handler.VolumeSource`."""

    def __init__(self, key_source: KeySource | None) -> None:
        self.key_source = key_source
        self._luns: dict[str, Lun] = {}
        self._lock = threading.Lock()

    def all(self) -> list[Lun]:
        with self._lock:
            return list(self._luns.values())

    def find(self, what: str) -> Lun:
        """The LUN named ``what``, or whose backing store is at ``what``."""
        real = os.path.realpath(what) if what.startswith("/") else None
        with self._lock:
            for lun in self._luns.values():
                if lun.name == what or lun.path == real:
                    return lun
        raise ControlError(Code.NOT_FOUND, f"no LUN {what!r}; 'evlu lun list' shows them")

    def by_device(self, so_name: str) -> Lun | None:
        with self._lock:
            return next((lun for lun in self._luns.values() if so_name in lun.devices), None)

    def _unique(self, name: str) -> str:
        taken = {lun.name for lun in self._luns.values()}
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    # -- lun.add ----------------------------------------------------------------

    def add(self, path: str, *, name: str | None, target: str | None, plain: bool) -> Lun:
        """Open the backing store at ``path``, read its header and ask for its key."""
        if not path.startswith("/"):
            raise ControlError(Code.INVALID_PARAMS, f"the path must be absolute, not {path!r}")
        if name is not None and not _NAME.fullmatch(name):
            raise ControlError(Code.INVALID_PARAMS, f"LUN name {name!r}: use letters, digits, "
                               "'_', '.' and '-'")
        real = os.path.realpath(path)
        with self._lock:
            existing = self._luns.get(real)
            if existing is not None:
                if existing.added:
                    raise ControlError(Code.CONFLICT, f"{path} is already LUN {existing.name}")
                existing.added, existing.target = True, target  # served already: now configured
                return existing
            if name is not None and any(lun.name == name for lun in self._luns.values()):
                raise ControlError(Code.CONFLICT, f"a LUN named {name!r} exists already")
        volume = _open_checked(real, plain, self.key_source, name or name_for(path))
        with self._lock:
            if real in self._luns:
                volume.close()
                raise ControlError(Code.CONFLICT, f"{path} was added meanwhile")
            lun = self._luns[real] = Lun(self._unique(name or name_for(path)), real, volume,
                                         added=True, target=target)
        return lun

    # -- VolumeSource (the TCMU handler) ---------------------------------------------

    def acquire(self, config: DeviceConfig, name: str) -> Volume:
        real = os.path.realpath(config.path)
        with self._lock:
            lun = self._luns.get(real)
            if lun is not None:
                lun.devices.add(name)
                volume = lun.volume
                if not config.allow_plain or volume.allow_plain:
                    return volume
        if lun is not None:  # the device may serve it plain: let a plain store be served
            volume.allow_plain = True
            volume.rescan()
            return volume
        volume = Volume.open(open_backstore(real), key_source=self.key_source,
                             allow_plain=config.allow_plain, name=name)
        with self._lock:
            self._luns[real] = Lun(self._unique(name), real, volume, devices={name})
        return volume

    def release(self, volume: Volume, name: str) -> None:
        with self._lock:
            lun = next((lun for lun in self._luns.values() if lun.volume is volume), None)
            if lun is None:
                return
            lun.devices.discard(name)
            if lun.added or lun.devices:
                return
            del self._luns[lun.path]
        volume.close()

    def close(self) -> None:
        """Close every volume no device holds any more (the rest go with their devices)."""
        with self._lock:
            idle = [lun for lun in self._luns.values() if not lun.devices]
            for lun in idle:
                del self._luns[lun.path]
        for lun in idle:
            lun.volume.close()


def _open_checked(path: str, plain: bool, key_source: KeySource | None, name: str) -> Volume:
    """The volume at ``path`` if its header is usable (or it may be plain)."""
    try:
        backstore = open_backstore(path)
    except BackstoreError as exc:
        code = Code.NOT_FOUND if isinstance(exc.__cause__, FileNotFoundError) else Code.UNUSABLE
        raise ControlError(code, str(exc)) from None
    try:
        fmt.read(backstore)
    except fmt.NoHeaderError:
        if not plain:
            backstore.close()
            raise ControlError(Code.NO_HEADER, f"{path} has no eVLU header: format it with "
                               "'evlu format', or add it with plain to serve it unencrypted") \
                from None
    except (fmt.FormatError, BackstoreError) as exc:
        backstore.close()
        raise ControlError(Code.UNUSABLE, f"{path}: eVLU header unusable: {exc}") from None
    volume = Volume.open(backstore, key_source=key_source, allow_plain=plain, name=name)
    if volume.state == State.UNKNOWN:
        reason = volume.reason
        volume.close()
        raise ControlError(Code.UNUSABLE, f"{path}: {reason}")
    return volume
