"""Stock LIO ``fileio`` and ``block`` backstores turned into eVLUs (``encrypt``).

What LIO holds is first read into plain data (:func:`observe`, through
rtslib); which backstore a name means, whether it can become an eVLU and
which exports go with it are decided on that data alone (:func:`resolve`,
:func:`plan`); :class:`RtsSteps` then removes the stock storage object with
its exports and re-creates them over the new ``user:evlu`` backstore, or puts
the stock ones back.

The new backstore and the re-created LUNs stay in the targets that held the
stock ones: targets gatewayd does not own (they are not in ``lio.toml``), so
they are kept, like the rest of those targets, by targetcli's ``saveconfig``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from configshell_fb import ExecutionError
from rtslib_fb import LUN, TPG, FabricModule, MappedLUN, NodeACL, RTSRoot, Target, tcm

from gateway import format as fmt
from gateway.backstore import BackstoreError, open_backstore
from gateway.lio import state as st
from gateway.lio.reconcile import MAX_TRANSFER
from gateway.lio.rts import RtsLio
from gateway.tcmu import cfgstring

from .inventory import human_size

STOCK = ("fileio", "block")  # the plugins (rtslib's names) whose store can become an eVLU
HEADER_AREA = fmt.DEFAULT_DATA_OFFSET
DEFAULT_ALUA = "default_tg_pt_gp"
_WHY_NOT = {
    "ramdisk": "keeps its data in memory: there is no file or device to hold an eVLU header",
    "pscsi": "passes SCSI commands through to a device; only fileio and block backstores "
             "can become eVLUs",
    "user": "is served by a TCMU handler; only fileio and block backstores can become eVLUs",
}


@dataclass(frozen=True)
class StorageObject:
    """One LIO storage object, and what its file or device is now."""

    plugin: str                # rtslib's: fileio, block, ramdisk, pscsi, user
    name: str
    path: str = ""             # its file or block device ("" for ramdisk, pscsi, user)
    size: int = 0              # bytes the file or device holds now
    block_size: int = 512
    readonly: bool = False
    config: str = ""           # a user backstore's configuration string
    luks: bool = False         # the store already begins with a LUKS signature
    problem: str = ""          # why its file or device could not be read
    dump: Mapping[str, Any] = field(default_factory=dict, compare=False)  # rtslib's, to restore

    @property
    def qualified(self) -> str:
        return f"{self.plugin}/{self.name}"

    def __str__(self) -> str:
        return self.qualified


@dataclass(frozen=True)
class LunExport:
    """A TPG LUN and the storage object it exports."""

    fabric: str
    wwn: str
    tag: int
    lun: int
    alias: str
    backstore: tuple[str, str]  # (plugin, name)
    alua_group: str | None = DEFAULT_ALUA

    def __str__(self) -> str:
        return f"{self.tpg_path}/lun{self.lun}"

    @property
    def tpg_path(self) -> str:
        return f"/{self.fabric}/{self.wwn}/tpg{self.tag}"


@dataclass(frozen=True)
class MappedExport:
    """An ACL's mapped LUN: ``mapped_lun`` of ``initiator`` is TPG LUN ``tpg_lun``."""

    fabric: str
    wwn: str
    tag: int
    initiator: str
    mapped_lun: int
    tpg_lun: int
    write_protect: bool = False
    alias: str = ""

    def __str__(self) -> str:
        return (f"/{self.fabric}/{self.wwn}/tpg{self.tag}/acls/{self.initiator}/"
                f"mapped_lun{self.mapped_lun} -> lun{self.tpg_lun}"
                + (" (write-protected)" if self.write_protect else ""))


@dataclass(frozen=True)
class Snapshot:
    """What LIO holds: storage objects, TPG LUNs, mapped LUNs."""

    storage_objects: tuple[StorageObject, ...] = ()
    luns: tuple[LunExport, ...] = ()
    mapped: tuple[MappedExport, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A stock backstore to turn into the eVLU of the same name, and its exports."""

    source: StorageObject
    luns: tuple[LunExport, ...]
    mapped: tuple[MappedExport, ...]

    @property
    def capacity(self) -> int:
        """Bytes initiators see once it is an eVLU: the store after the header area."""
        bs = self.source.block_size
        return (self.source.size - HEADER_AREA) // bs * bs

    @property
    def exports(self) -> list[LunExport | MappedExport]:
        return [*self.luns, *self.mapped]


def resolve(name: str, evlus: Iterable[str], snapshot: Snapshot | None) -> StorageObject | None:
    """The storage object ``name`` means, or None for the eVLU of that name.

    ``PLUGIN/NAME`` (optionally ``/backstores/PLUGIN/NAME``, as targetcli shows it)
    names a storage object; a bare NAME is the eVLU of that name if there is
    one (a stock backstore of the same name could not take it anyway), else
    the one storage object of that name.  ``snapshot`` is None where LIO
    cannot be read."""
    evlus = set(evlus)
    qualified = name.removeprefix("/backstores/")
    if "/" in qualified:
        plugin, _, so_name = qualified.partition("/")
        plugin = {"user:evlu": "user", "iblock": "block", "rd_mcp": "ramdisk"}.get(plugin, plugin)
        if snapshot is None:
            raise ExecutionError(f"LIO (configfs) cannot be read here: {name} cannot be encrypted")
        found = [so for so in snapshot.storage_objects if (so.plugin, so.name) == (plugin, so_name)]
        if not found:
            raise ExecutionError(f"no backstore {plugin}/{so_name}; {_candidates(evlus, snapshot)}")
        return found[0]
    if name in evlus:
        return None
    found = [so for so in (snapshot.storage_objects if snapshot else ())
             if so.name == name and so.plugin != "user"]
    if not found:
        raise ExecutionError(f"no eVLU or backstore named {name!r}; "
                             f"{_candidates(evlus, snapshot)}")
    if len(found) > 1:
        raise ExecutionError(f"{name!r} could be {' or '.join(so.qualified for so in found)}: "
                             "say which")
    return found[0]


def _candidates(evlus: set[str], snapshot: Snapshot | None) -> str:
    stock = [so.qualified for so in (snapshot.storage_objects if snapshot else ())
             if so.plugin in STOCK]
    return (f"eVLUs: {', '.join(sorted(evlus)) or 'none'}; stock backstores: "
            f"{', '.join(sorted(stock)) or 'none'}")


def plan(source: StorageObject, snapshot: Snapshot,
         evlus: Mapping[str, str]) -> Plan:
    """What turning ``source`` into an eVLU takes: its exports; an ExecutionError
    with every reason it cannot be done.  ``evlus``: gatewayd's LUNs, name -> path."""
    where = source.qualified
    if source.plugin not in STOCK:
        why = _WHY_NOT.get(source.plugin, "is not a fileio or block backstore")
        if source.config.startswith(f"{cfgstring.SUBTYPE}/"):
            why = "is a user:evlu backstore already: /encryption shows it"
        raise ExecutionError(f"cannot encrypt {where}: it {why}")
    luns = tuple(sorted((x for x in snapshot.luns if x.backstore == (source.plugin, source.name)),
                        key=lambda x: (x.fabric, x.wwn, x.tag, x.lun)))
    keys = {(x.fabric, x.wwn, x.tag, x.lun) for x in luns}
    mapped = tuple(sorted((m for m in snapshot.mapped
                           if (m.fabric, m.wwn, m.tag, m.tpg_lun) in keys),
                          key=lambda m: (m.fabric, m.wwn, m.tag, m.initiator, m.mapped_lun)))
    problems = _problems(source, snapshot, evlus)
    problems += [f"LUN {x} is in the ALUA group {x.alua_group} of {where}; a new backstore "
                 f"has only {DEFAULT_ALUA}: move the LUN to it first"
                 for x in luns if x.alua_group not in (None, DEFAULT_ALUA)]
    if problems:
        raise ExecutionError(f"cannot encrypt {where}: " + "; ".join(problems))
    return Plan(source, luns, mapped)


def _problems(so: StorageObject, snapshot: Snapshot, evlus: Mapping[str, str]) -> list[str]:
    if so.problem:
        return [f"its store {so.path or '?'} cannot be read: {so.problem}"]
    try:
        cfgstring.parse(so.path)
    except ValueError as exc:
        return [f"user:evlu cannot serve {so.path}: {exc}"]
    problems = []
    if so.readonly:
        problems.append("it is read-only, and an eVLU writes its header: re-create it "
                        "writable first")
    if so.block_size not in (512, 4096):
        problems.append(f"it has {so.block_size}-byte blocks; an eVLU has 512- or 4096-byte "
                        "sectors")
    elif so.size < HEADER_AREA + so.block_size:
        problems.append(f"{so.path} holds {so.size} bytes ({human_size(so.size)}): an eVLU "
                        f"needs {human_size(HEADER_AREA)} for its header area plus room for "
                        "data")
    if so.luks:
        problems.append(f"{so.path} begins with a LUKS header already (encrypting would destroy "
                        f"what it protects): to serve an eVLU, delete {so.qualified} and run "
                        f"'evlu lun add {so.path}'")
    real = os.path.realpath(so.path)
    problems += [f"{so.path} is also the store of {other.qualified}"
                 for other in snapshot.storage_objects
                 if other != so and other.path and os.path.realpath(other.path) == real]
    problems += [f"gatewayd serves {so.path} already, as eVLU {name}"
                 for name, path in evlus.items() if os.path.realpath(path) == real]
    if so.name in evlus:
        problems.append(f"an eVLU named {so.name} exists already, and the new one takes the "
                        "backstore's name")
    if any((o.plugin, o.name) == ("user", so.name) for o in snapshot.storage_objects):
        problems.append(f"a user backstore named {so.name} exists already")
    return problems


# -- what to type when a step fails ---------------------------------------------------

Export = LunExport | MappedExport
Failure = tuple[StorageObject | Export, str]  # what could not be (re-)created, and why


def commands(exports: Iterable[Export], backstore: str) -> list[str]:
    """targetcli commands that re-create ``exports`` over ``backstore``
    (e.g. ``/backstores/fileio/disk1``)."""
    out = []
    for x in exports:
        if isinstance(x, LunExport):
            out.append(f"{x.tpg_path}/luns create {backstore} lun={x.lun} add_mapped_luns=false")
        else:
            out.append(f"/{x.fabric}/{x.wwn}/tpg{x.tag}/acls/{x.initiator} create mapped_lun="
                       f"{x.mapped_lun} tpg_lun_or_backstore={x.tpg_lun} "
                       f"write_protect={str(x.write_protect).lower()}")
    return out


def failures(failed: list[Failure], backstore: str) -> str:
    """``failed`` and the commands that make up for it."""
    exports = [x for x, _ in failed if not isinstance(x, StorageObject)]
    return ("; ".join(f"{x} ({why})" for x, why in failed)
            + (". Re-create with: " + "; ".join(commands(exports, backstore)) if exports else ""))


# -- LIO through rtslib ----------------------------------------------------------------

def observe(root: RTSRoot) -> Snapshot:
    """LIO's storage objects (their fileio/block stores opened read-only) and exports."""
    tcm.bs_cache.clear()  # rtslib caches backstore indexes per process: others change them
    sos = tuple(_storage_object(so) for so in root.storage_objects)
    luns, mapped = [], []
    for tpg in root.tpgs:
        target = tpg.parent_target
        fabric = target.fabric_module.name
        for lun in tpg.luns:
            so = lun.storage_object
            luns.append(LunExport(fabric, target.wwn, tpg.tag, lun.lun, lun.alias,
                                  (so.plugin, so.name), lun.alua_tg_pt_gp_name))
        if tpg.has_feature("acls"):
            mapped += [MappedExport(fabric, target.wwn, tpg.tag, acl.node_wwn, m.mapped_lun,
                                    m.tpg_lun.lun, m.write_protect, m.alias)
                       for acl in tpg.node_acls for m in acl.mapped_luns]
    return Snapshot(sos, tuple(luns), tuple(mapped))


def _storage_object(so: Any) -> StorageObject:
    if so.plugin not in STOCK:
        return StorageObject(so.plugin, so.name,
                             config=(so.config or "") if so.plugin == "user" else "")
    path = so.udev_path or ""
    common = {"plugin": so.plugin, "name": so.name, "path": path,
              "block_size": int(so.get_attribute("block_size")),
              "readonly": bool(getattr(so, "readonly", False)), "dump": so.dump()}
    try:
        with open_backstore(path, readonly=True) as dev:
            return StorageObject(**common, size=dev.size, luks=fmt.probe(dev))
    except (BackstoreError, OSError) as exc:
        return StorageObject(**common, problem=str(exc))


class RtsSteps:
    """The changes ``encrypt`` makes to LIO, each undone or reported when it fails."""

    def __init__(self, root: RTSRoot) -> None:
        self.root = root

    def observe(self) -> Snapshot:
        return observe(self.root)

    def remove(self, plan: Plan) -> None:
        """Delete the stock backstore and its exports; when that fails, put back what
        was deleted and raise an ExecutionError saying so."""
        try:
            for m in plan.mapped:
                MappedLUN(self._acl(m), m.mapped_lun).delete()
            for x in plan.luns:
                LUN(self._tpg(x), x.lun).delete()
            tcm.so_mapping[plan.source.plugin](plan.source.name).delete()
        except Exception as exc:  # rtslib raises RTSLibError, OSError, ...
            failed = self.restore(plan)
            state = (failures(failed, f"/backstores/{plan.source.qualified}") if failed else
                     "it and its exports are back as they were")
            raise ExecutionError(f"could not remove {plan.source.qualified}: {exc}; "
                                 f"{state}") from None

    def restore(self, plan: Plan) -> list[Failure]:
        """Re-create the stock backstore and whatever of its exports is missing;
        what could not be."""
        src = plan.source
        failed: list[Failure] = []
        if not self._exists(src):
            try:
                errors = self.root.restore({"storage_objects": [dict(src.dump)]})
            except Exception as exc:  # rtslib: RTSLibError, OSError
                errors = [str(exc)]
            if not self._exists(src):
                return [(src, f"{'; '.join(errors)}; re-create it with '/backstores/{src.plugin}"
                              f" create {src.name} {src.path}'"),
                        *((x, f"{src.qualified} is missing") for x in plan.exports)]
            failed += [(src, f"re-created, but: {e}") for e in errors]
        return failed + self.export(plan, src.plugin, src.name)[1]

    def _exists(self, so: StorageObject) -> bool:
        tcm.bs_cache.clear()
        return any((o.plugin, o.name) == (so.plugin, so.name) for o in self.root.storage_objects)

    def create_evlu(self, plan: Plan, size: int, serial: str) -> None:
        """The ``user:evlu`` backstore (the stock one's name) of the formatted store,
        made as gatewayd's reconciler makes its own."""
        src = plan.source
        RtsLio().execute(st.Change("create", st.Backstore(
            src.name, f"{cfgstring.SUBTYPE}/{src.path}", size, src.block_size, serial,
            MAX_TRANSFER // src.block_size)))

    def export(self, plan: Plan, plugin: str, name: str) -> tuple[list[Export], list[Failure]]:
        """Make ``plan``'s LUNs and mapped LUNs (those missing) export ``plugin/name``;
        (what was made, what was not and why)."""
        so = tcm.so_mapping[plugin](name)
        done: list[Export] = []
        failed: list[Failure] = []
        for x in plan.luns:
            try:
                tpg = self._tpg(x)
                if not any(lun.lun == x.lun for lun in tpg.luns):
                    LUN(tpg, x.lun, storage_object=so, alias=x.alias)
                    done.append(x)
            except Exception as exc:
                failed.append((x, str(exc)))
        for m in plan.mapped:
            try:
                acl = self._acl(m)
                if not any(have.mapped_lun == m.mapped_lun for have in acl.mapped_luns):
                    MappedLUN(acl, m.mapped_lun, m.tpg_lun, m.write_protect, m.alias or None)
                    done.append(m)
            except Exception as exc:
                failed.append((m, str(exc)))
        return done, failed

    @staticmethod
    def _tpg(x: LunExport | MappedExport) -> TPG:
        return TPG(Target(FabricModule(x.fabric), x.wwn, "lookup"), x.tag, "lookup")

    def _acl(self, m: MappedExport) -> NodeACL:
        return NodeACL(self._tpg(m), m.initiator, "lookup")
