"""Apply a :class:`LioConfig` to the kernel target idempotently, or roll back.

``Reconciler(lio).plan(config)`` reads the eVLU headers (sizes, serials,
block sizes), observes LIO and returns the changes; ``apply(config)`` makes
them one by one and, if one fails, undoes the ones made, newest first, then
raises :class:`ApplyError` saying what was changed and what was rolled back.

Ownership: the gateway owns the targets its configuration lists and the
``user:evlu`` backstores its LUNs use, and keeps, in ``lio-owned.json`` beside
the configuration, the list of what it owned after its last apply, so that
entries removed from the configuration are removed from LIO.  Everything else
(other targets, fileio/block backstores, another tool's ``user`` backstores)
is left alone; a backstore the configuration dropped stays while a foreign
LUN uses it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import format as fmt
from ..backstore import BackstoreError, open_backstore
from ..tcmu.cfgstring import SUBTYPE
from . import config as cfg
from . import state as st
from .state import Auth, Change, Ownership, PlanConflict, State

log = logging.getLogger(__name__)

OWNED_FILE = "lio-owned.json"
MAX_TRANSFER = 8 << 20   # hw_max_sectors: 8 MiB per command, as LIO's fileio/iblock
_PLAIN_NAMESPACE = uuid.UUID("6f1d2c2a-52a5-4b8e-9d4c-0b7f8e7c1a10")

__all__ = ["ApplyError", "Backing", "Change", "Lio", "PlanError", "Reconciler", "desired"]


class Lio(Protocol):
    """What the reconciler needs from the kernel: see :class:`gateway.lio.rts.RtsLio`."""

    def observe(self) -> State: ...

    def execute(self, change: Change) -> None: ...


class PlanError(Exception):
    """The configuration cannot be applied as the storage is: one ``field: reason`` each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"cannot apply the LIO configuration, {len(problems)} problem(s):\n"
                         + "\n".join(f"  {p}" for p in problems))


class ApplyError(Exception):
    """A change failed: what was applied, what was rolled back, what was not."""

    def __init__(self, failed: Change, cause: str, total: int, applied: list[Change],
                 rolled_back: list[Change], stuck: list[tuple[Change, str]]) -> None:
        self.failed, self.cause = failed, cause
        self.applied, self.rolled_back, self.stuck = applied, rolled_back, stuck
        lines = [f"step {len(applied) + 1} of {total} failed: {failed}: {cause}"]
        if not applied:
            lines.append("nothing had been changed before it")
        elif not stuck:
            lines.append(f"the {len(applied)} change(s) made before it were rolled back: LIO is "
                         "as it was before this apply")
        else:
            lines.append("LIO is NOT as it was: these changes are in place and could not be "
                         "rolled back:")
            lines += [f"  {change}  (undo failed: {why})" for change, why in stuck]
            if rolled_back:
                lines.append("these were rolled back:")
                lines += [f"  {change}" for change in rolled_back]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Backing:
    """What a LUN's backing store shows initiators."""

    size: int                  # bytes: the data segment (or the whole plain store)
    sector_size: int | None    # the eVLU's; None for a plain store
    uuid: str | None
    kms: tuple[str, ...] = ()  # KMS profiles the eVLU's bindings name


def read_backing(path: str, block_size: int) -> Backing:
    """Read the eVLU header of ``path`` (a plain store: its size in whole blocks)."""
    dev = open_backstore(path, readonly=True)
    try:
        try:
            header = fmt.read(dev).header
        except fmt.NoHeaderError:
            return Backing(dev.size // block_size * block_size, None, None)
        seg = header.metadata.data_segment
        size = (dev.size - seg.offset) // seg.sector_size * seg.sector_size
        return Backing(size, seg.sector_size, header.uuid,
                       tuple(t.kms for t in header.metadata.evlu_tokens()))
    finally:
        dev.close()


def _backing_problems(lun: cfg.Lun, backing: Backing) -> list[tuple[str, str]]:
    """(field, reason) for each way the store does not match the LUN's entry."""
    if backing.sector_size is None:
        if not lun.plain:
            return [("path", f"{lun.path} has no eVLU header: run 'evlu format {lun.path} "
                             "--kms', or set plain = true to serve it unencrypted")]
    elif backing.sector_size != lun.block_size:
        return [("block_size", f"{lun.block_size}, but the eVLU at {lun.path} has "
                               f"{backing.sector_size}-byte sectors")]
    out = []
    if lun.kms is not None and backing.sector_size is not None and lun.kms not in backing.kms:
        out.append(("kms", f"the eVLU at {lun.path} has no binding in KMS profile {lun.kms!r} "
                           f"(it has: {', '.join(backing.kms) or 'none'})"))
    if backing.size <= 0:
        out.append(("path", f"{lun.path} has no room for data"))
    return out


def _auth(chap: cfg.Chap | None) -> Auth:
    if chap is None:
        return Auth()
    return Auth(chap.userid, chap.password, chap.mutual_userid, chap.mutual_password)


def _flag(value: bool) -> str:
    return "1" if value else "0"


def desired(config: cfg.LioConfig, backings: dict[str, Backing],
            owned_discovery: bool = False) -> State:
    """The LIO objects ``config`` describes; ``backings`` by backstore name (sans-IO)."""
    objects: list[st.Obj] = []
    for target in config.targets:
        iqn = target.iqn
        objects.append(st.Target(iqn))
        for tpg in target.tpgs:
            attrs = {"authentication": _flag(tpg.enforces_auth),
                     "generate_node_acls": _flag(tpg.generate_node_acls),
                     "demo_mode_write_protect": _flag(tpg.demo_mode_write_protect)}
            if tpg.generate_node_acls:
                attrs["cache_dynamic_acls"] = "1"
            attrs |= {k: str(v) for k, v in tpg.attributes.items()}
            objects.append(st.Tpg(iqn, tpg.tag, tuple(sorted(attrs.items())), _auth(tpg.chap)))
            if tpg.enable:
                objects.append(st.Enable(iqn, tpg.tag))
            objects += [st.Portal(iqn, tpg.tag, p.ip, p.port) for p in tpg.portals]
            for lun in tpg.luns:
                name = lun.backstore_name
                backing = backings[name]
                objects.append(st.Backstore(
                    name, f"{SUBTYPE}/{lun.cfgstring}", backing.size, lun.block_size,
                    lun.serial or backing.uuid or str(uuid.uuid5(_PLAIN_NAMESPACE, lun.path)),
                    MAX_TRANSFER // lun.block_size, write_cache=lun.write_cache))
                objects.append(st.Lun(iqn, tpg.tag, lun.lun, name))
            for acl in tpg.acls:
                attrs = {k: str(v) for k, v in acl.attributes.items()}
                objects.append(st.Acl(iqn, tpg.tag, acl.initiator, tuple(sorted(attrs.items())),
                                      _auth(acl.chap)))
                objects += [st.MappedLun(iqn, tpg.tag, acl.initiator, m.index, m.lun,
                                         m.write_protect) for m in acl.mapped_luns]
    if config.discovery is not None:
        objects.append(st.Discovery(config.discovery.enable, _auth(config.discovery.chap)))
    elif owned_discovery:   # the configuration dropped it: turn it off
        objects.append(st.Discovery(False, Auth()))
    return State.of(objects)


class OwnedFile:
    """``lio-owned.json``: the targets, backstores and discovery auth the gateway owns."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Ownership:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Ownership()
        return Ownership(frozenset(doc.get("targets", ())), frozenset(doc.get("backstores", ())),
                         bool(doc.get("discovery", False)))

    def save(self, owned: Ownership) -> None:
        doc = {"targets": sorted(owned.targets), "backstores": sorted(owned.backstores),
               "discovery": owned.discovery}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.path)


class Reconciler:
    """Brings LIO to a configuration: :meth:`plan` says how, :meth:`apply` does it."""

    def __init__(self, lio: Lio | None = None, *,
                 owned_path: str | os.PathLike[str] | None = None,
                 read: Callable[[str, int], Backing] = read_backing) -> None:
        if lio is None:
            from .rts import RtsLio
            lio = RtsLio()
        self.lio = lio
        self.owned = OwnedFile(Path(owned_path) if owned_path else cfg.config_dir() / OWNED_FILE)
        self._read = read
        self._lock = threading.Lock()

    def _desired(self, config: cfg.LioConfig, owned: Ownership) -> State:
        """The desired state; :class:`PlanError` when a backing store does not fit."""
        problems, backings = [], {}
        for where, lun in config.luns():
            name = lun.backstore_name
            if name in backings:
                continue
            try:
                backing = backings[name] = self._read(lun.path, lun.block_size)
            except (OSError, BackstoreError) as exc:
                problems.append(f"{where}.path: {exc}")
                continue
            except fmt.FormatError as exc:
                problems.append(f"{where}.path: the eVLU header of {lun.path} is unusable: {exc}")
                continue
            problems += [f"{where}.{field}: {why}" for field, why in _backing_problems(lun, backing)]
        if problems:
            raise PlanError(problems)
        return desired(config, backings, owned.discovery)

    def _plan(self, config: cfg.LioConfig) -> tuple[list[Change], State, Ownership]:
        previous = self.owned.load()
        want = self._desired(config, previous)
        owned = previous | Ownership.of(want)
        try:
            return st.diff(want, self.lio.observe(), owned), want, previous
        except PlanConflict as exc:
            raise PlanError([str(exc)]) from None

    def plan(self, config: cfg.LioConfig) -> list[Change]:
        """The changes :meth:`apply` would make now (nothing is changed)."""
        with self._lock:
            return self._plan(config)[0]

    def apply(self, config: cfg.LioConfig) -> list[Change]:
        """Make LIO match ``config``; the changes made (none when it already does)."""
        with self._lock:
            changes, want, previous = self._plan(config)
            done: list[Change] = []
            try:
                for change in changes:
                    log.info("lio: %s", change)
                    self.lio.execute(change)
                    done.append(change)
            except Exception as exc:
                error = self._roll_back(change, exc, len(changes), done)
                self._record(previous | Ownership.of(want))
                raise error from exc
            self._record(previous | Ownership.of(want))
            return changes

    def _roll_back(self, failed: Change, exc: Exception, total: int,
                   done: list[Change]) -> ApplyError:
        cause = str(exc) or type(exc).__name__
        log.error("lio: failed: %s: %s; rolling back %d change(s)", failed, cause, len(done))
        rolled, stuck = [], []
        for change in reversed(done):
            try:
                self.lio.execute(change.inverse())
                rolled.append(change)
            except Exception as undo_exc:  # keep going: undo as much as possible
                stuck.append((change, str(undo_exc) or type(undo_exc).__name__))
                log.error("lio: could not undo: %s: %s", change, undo_exc)
        return ApplyError(failed, cause, total, done, rolled, stuck)

    def _record(self, candidates: Ownership) -> None:
        """Remember what the gateway owns among what now exists."""
        now = self.lio.observe()
        targets = {o.iqn for o in now.all(st.Target)}
        backstores = {o.name for o in now.all(st.Backstore)}
        self.owned.save(Ownership(candidates.targets & targets,
                                  candidates.backstores & backstores, candidates.discovery))
