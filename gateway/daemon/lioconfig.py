"""gatewayd's reconciler: ``lio.toml`` (``gateway.lio``) applied through rtslib-fb.

Implements :class:`gateway.daemon.reconciler.Reconciler`.  The configuration
file is the record of what is exported: ``add_lun`` writes the new LUN into
``lio.toml`` (and so survives restarts and reboots) before applying it.  A
missing ``lio.toml`` is an empty configuration: nothing exported.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

from ..backstore import BackstoreError
from ..format import FormatError
from ..lio import config as cfg
from ..lio.reconcile import ApplyError, PlanError, Reconciler, read_backing

_FAILURES = (ValueError, OSError, BackstoreError, FormatError, cfg.ConfigError, PlanError,
             ApplyError)


class LioError(RuntimeError):
    """The LIO configuration could not be read, changed or applied (the message says why)."""


class NoTargetError(LioError, LookupError):
    """No target was given and lio.toml has none to export a LUN from."""


class LioFile:
    """``lio.toml`` + ``chap.toml`` in ``config_dir`` (default: the evlu config dir)."""

    def __init__(self, config_dir: Path | None = None,
                 reconciler: Reconciler | None = None) -> None:
        root = cfg.config_dir(config_dir)
        self.path, self.secrets = root / cfg.LIO_FILE, root / cfg.CHAP_FILE
        self.owned = root / "lio-owned.json"
        self._reconciler = reconciler  # made at first use: rtslib needs configfs
        self._lock = threading.Lock()

    @property
    def reconciler(self) -> Reconciler:
        if self._reconciler is None:
            self._reconciler = Reconciler(owned_path=self.owned)
        return self._reconciler

    def load(self) -> cfg.LioConfig:
        if not self.path.exists():
            return cfg.LioConfig()
        return cfg.load(self.path, self.secrets)

    def apply(self) -> list[str]:
        with self._lock:
            try:
                return [str(change) for change in self.reconciler.apply(self.load())]
            except NoTargetError:
                raise
            except _FAILURES as exc:
                raise LioError(str(exc)) from None

    def save(self) -> dict[str, object]:
        """Where the configuration is; it is written at every change, so nothing is pending."""
        return {"path": str(self.path), "luns": sorted(self.configured())}

    def configured(self) -> dict[str, str]:
        try:
            config = self.load()
        except cfg.ConfigError:
            return {}
        return {lun.path: lun.backstore_name for _, lun in config.luns()}

    def add_lun(self, path: str, name: str, target: str | None) -> list[str]:
        """Export ``path`` as the next free LUN of ``target``'s first TPG (default: the
        first target), mapped to every ACL of that TPG; written to lio.toml, then applied."""
        with self._lock:
            try:
                config = self.load()
                real = os.path.realpath(path)
                if not any(os.path.realpath(lun.path) == real for _, lun in config.luns()):
                    config = with_lun(config, path, target, read_backing(path, 512).sector_size)
                    cfg.parse(cfg.to_doc(config), config.credentials(), str(self.path))
                    cfg.save(config, self.path, self.secrets)
                return [str(c) for c in self.reconciler.apply(config)]
            except NoTargetError:
                raise
            except _FAILURES as exc:
                raise LioError(str(exc)) from None


def with_lun(config: cfg.LioConfig, path: str, target: str | None,
             sector_size: int | None) -> cfg.LioConfig:
    """``config`` with ``path`` exported by ``target`` (a new target when not configured)."""
    if target is None:
        if not config.targets:
            raise NoTargetError(f"{cfg.LIO_FILE} has no target: give one (--target IQN)")
        target = config.targets[0].iqn
    why = cfg.check_wwn(target)
    if why:
        raise ValueError(f"target {target!r}: {why}")
    targets = list(config.targets)
    index = next((i for i, t in enumerate(targets) if t.iqn == target.lower()), None)
    if index is None:
        targets.append(cfg.Target(target.lower(), (cfg.Tpg(),)))
        index = len(targets) - 1
    tpg = targets[index].tpgs[0] if targets[index].tpgs else cfg.Tpg()
    number = max((lun.lun for lun in tpg.luns), default=-1) + 1
    lun = cfg.Lun(number, path, block_size=sector_size or 512, plain=sector_size is None)
    acls = tuple(dataclasses.replace(acl, mapped_luns=acl.mapped_luns + (cfg.MappedLun(number),))
                 for acl in tpg.acls)
    tpg = dataclasses.replace(tpg, luns=tpg.luns + (lun,), acls=acls)
    targets[index] = dataclasses.replace(targets[index], tpgs=(tpg,) + targets[index].tpgs[1:])
    return dataclasses.replace(config, targets=tuple(targets))
