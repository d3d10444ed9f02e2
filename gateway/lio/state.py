"""LIO objects as plain data, and the diff from observed to desired (sans-IO).

One frozen dataclass per configfs concept; a :class:`State` maps each
object's key to it.  :func:`diff` turns (desired, observed, ownership) into
the ordered :class:`Change` list that makes observed equal desired for the
objects the gateway owns, and never touches the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

#: creation order; deletions run in the reverse order, before any creation
KINDS = ("backstore", "target", "tpg", "portal", "lun", "acl", "mapped_lun", "discovery",
         "enable")


T = TypeVar("T", bound="Obj")


@dataclass(frozen=True)
class Auth:
    """CHAP settings of an ACL, a TPG or discovery; empty strings mean unset."""

    userid: str = ""
    password: str = field(default="", repr=False)
    mutual_userid: str = ""
    mutual_password: str = field(default="", repr=False)

    def __str__(self) -> str:
        if not self.userid:
            return "no CHAP"
        return f"CHAP user {self.userid}" + (f", mutual user {self.mutual_userid}"
                                             if self.mutual_userid else "")


@dataclass(frozen=True)
class Obj:
    """Base of the LIO objects: a key, a kind, and which fields force re-creation."""

    kind: ClassVar[str]
    immutable: ClassVar[frozenset[str]] = frozenset()
    key_fields: ClassVar[tuple[str, ...]]

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind,) + tuple(getattr(self, f) for f in self.key_fields)

    @property
    def owner(self) -> tuple[str, str] | None:
        """("target", iqn) or ("backstore", name): what owning decides ours."""
        iqn = getattr(self, "iqn", None)
        return ("target", iqn) if iqn is not None else None

    def differences(self, observed: Obj) -> tuple[str, ...]:
        """Fields whose desired value (self) differs from ``observed``."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(observed, f.name)
            if f.name == "attributes":   # only the attributes the configuration sets
                if any(dict(theirs).get(k) != v for k, v in mine):
                    out.append(f.name)
            elif mine != theirs:
                out.append(f.name)
        return tuple(out)

    def describe(self) -> str:
        return " ".join(str(part) for part in self.key[1:])


@dataclass(frozen=True)
class Backstore(Obj):
    """A ``user:evlu`` storage object."""

    kind: ClassVar[str] = "backstore"
    key_fields: ClassVar[tuple[str, ...]] = ("name",)
    immutable: ClassVar[frozenset[str]] = frozenset(
        {"config", "block_size", "serial", "hw_max_sectors"})
    name: str
    config: str            # dev_config: "evlu/PATH[;plain]"
    size: int
    block_size: int
    serial: str
    hw_max_sectors: int
    nl_reply_supported: int = -1
    write_cache: bool = False  # emulate_write_cache

    @property
    def owner(self) -> tuple[str, str]:
        return ("backstore", self.name)

    def describe(self) -> str:
        return (f"user:evlu/{self.name} ({self.config}, {self.size} bytes, "
                f"{self.block_size}-byte blocks, serial {self.serial}"
                f"{', write cache on' if self.write_cache else ''})")


@dataclass(frozen=True)
class Target(Obj):
    kind: ClassVar[str] = "target"
    key_fields: ClassVar[tuple[str, ...]] = ("iqn",)
    iqn: str


@dataclass(frozen=True)
class Tpg(Obj):
    """A TPG's attributes and TPG-wide CHAP; enabling it is the separate :class:`Enable`."""

    kind: ClassVar[str] = "tpg"
    key_fields: ClassVar[tuple[str, ...]] = ("iqn", "tag")
    iqn: str
    tag: int
    attributes: tuple[tuple[str, str], ...] = ()
    auth: Auth = Auth()

    def describe(self) -> str:
        return f"{self.iqn} tpg {self.tag}"


@dataclass(frozen=True)
class Portal(Obj):
    kind: ClassVar[str] = "portal"
    key_fields: ClassVar[tuple[str, ...]] = ("iqn", "tag", "ip", "port")
    iqn: str
    tag: int
    ip: str
    port: int

    def describe(self) -> str:
        return f"{self.iqn} tpg {self.tag} {self.ip}:{self.port}"


@dataclass(frozen=True)
class Lun(Obj):
    kind: ClassVar[str] = "lun"
    key_fields: ClassVar[tuple[str, ...]] = ("iqn", "tag", "lun")
    immutable: ClassVar[frozenset[str]] = frozenset({"backstore", "plugin"})
    iqn: str
    tag: int
    lun: int
    backstore: str
    plugin: str = "user"

    def describe(self) -> str:
        return f"{self.iqn} tpg {self.tag} lun {self.lun} -> {self.plugin}/{self.backstore}"


@dataclass(frozen=True)
class Acl(Obj):
    kind: ClassVar[str] = "acl"
    key_fields: ClassVar[tuple[str, ...]] = ("iqn", "tag", "initiator")
    iqn: str
    tag: int
    initiator: str
    attributes: tuple[tuple[str, str], ...] = ()
    auth: Auth = Auth()

    def describe(self) -> str:
        return f"{self.iqn} tpg {self.tag} acl {self.initiator}"


@dataclass(frozen=True)
class MappedLun(Obj):
    kind: ClassVar[str] = "mapped_lun"
    key_fields: ClassVar[tuple[str, ...]] = ("iqn", "tag", "initiator", "mapped_lun")
    immutable: ClassVar[frozenset[str]] = frozenset({"tpg_lun"})
    iqn: str
    tag: int
    initiator: str
    mapped_lun: int
    tpg_lun: int
    write_protect: bool = False

    def describe(self) -> str:
        return (f"{self.iqn} tpg {self.tag} acl {self.initiator} mapped lun {self.mapped_lun}"
                f" -> lun {self.tpg_lun}" + (" (read-only)" if self.write_protect else ""))


@dataclass(frozen=True)
class Discovery(Obj):
    """The iSCSI fabric's discovery authentication (a singleton, never created or deleted)."""

    kind: ClassVar[str] = "discovery"
    key_fields: ClassVar[tuple[str, ...]] = ()
    enable: bool = False
    auth: Auth = Auth()

    @property
    def owner(self) -> tuple[str, str]:
        return ("discovery", "")

    def describe(self) -> str:
        return f"discovery authentication {'on' if self.enable else 'off'} ({self.auth})"


@dataclass(frozen=True)
class Enable(Obj):
    """Present when the TPG is enabled: creating it enables, deleting it disables."""

    kind: ClassVar[str] = "enable"
    key_fields: ClassVar[tuple[str, ...]] = ("iqn", "tag")
    iqn: str
    tag: int

    def describe(self) -> str:
        return f"{self.iqn} tpg {self.tag}"


class State(dict[tuple[Any, ...], Obj]):
    """LIO objects by key."""

    @classmethod
    def of(cls, objects: Iterable[Obj]) -> State:
        state = cls()
        for obj in objects:
            state[obj.key] = obj
        return state

    def all(self, cls: type[T]) -> Iterator[T]:
        return (o for o in self.values() if isinstance(o, cls))


@dataclass(frozen=True)
class Ownership:
    """What the gateway owns: whole targets, user:evlu backstores, discovery auth."""

    targets: frozenset[str] = frozenset()
    backstores: frozenset[str] = frozenset()
    discovery: bool = False

    def owns(self, obj: Obj) -> bool:
        kind, name = obj.owner
        return {"target": name in self.targets, "backstore": name in self.backstores,
                "discovery": self.discovery}[kind]

    def __or__(self, other: Ownership) -> Ownership:
        return Ownership(self.targets | other.targets, self.backstores | other.backstores,
                         self.discovery or other.discovery)

    @classmethod
    def of(cls, state: State) -> Ownership:
        """Everything ``state`` (a desired state) holds."""
        return cls(frozenset(o.iqn for o in state.all(Target)),
                   frozenset(o.name for o in state.all(Backstore)),
                   any(True for _ in state.all(Discovery)))


@dataclass(frozen=True)
class Change:
    """One step: create ``obj``, delete ``obj``, or update ``fields`` of ``old`` to ``obj``."""

    action: str          # "create" | "delete" | "update"
    obj: Obj
    old: Obj | None = None
    fields: tuple[str, ...] = ()

    def inverse(self) -> Change:
        if self.action == "create":
            return Change("delete", self.obj)
        if self.action == "delete":
            return Change("create", self.obj)
        assert self.old is not None
        return Change("update", self.old, self.obj, self.fields)

    def __str__(self) -> str:
        verb = {"create": "create", "delete": "delete", "update": "update"}[self.action]
        if self.obj.kind == "enable":
            verb = {"create": "enable", "delete": "disable"}[self.action]
            return f"{verb} tpg {self.obj.describe()}"
        text = f"{verb} {self.obj.kind.replace('_', ' ')} {self.obj.describe()}"
        if self.action == "update" and self.old is not None:
            parts = [_field_change(f, getattr(self.old, f), getattr(self.obj, f))
                     for f in self.fields]
            text += ": " + "; ".join(parts)
        return text


def _field_change(name: str, old: Any, new: Any) -> str:
    if name == "attributes":
        before = dict(old)
        return "attributes " + ", ".join(f"{k} {before.get(k, '?')} -> {v}" for k, v in new
                                         if before.get(k) != v)
    if isinstance(new, Auth):
        return f"{name}: {old} -> {new}" + (" (new secret)" if (old.password, old.mutual_password)
                                            != (new.password, new.mutual_password)
                                            and new.userid else "")
    return f"{name} {old} -> {new}"


class PlanConflict(Exception):
    """The desired state needs a change the gateway may not make (e.g. a foreign LUN)."""


def diff(desired: State, observed: State, owned: Ownership) -> list[Change]:
    """The changes that bring the objects ``owned`` covers from ``observed`` to ``desired``.

    Deletions come first, children before parents; then creations and updates,
    parents before children, TPGs enabled last.  An object whose immutable
    fields differ is deleted and re-created, and so is everything LIO removes
    with it (the LUNs of a backstore, the mapped LUNs of a LUN).
    """
    replaced: set[tuple[Any, ...]] = set()
    updates: dict[tuple[Any, ...], tuple[str, ...]] = {}
    for key, want in desired.items():
        if key not in observed:
            continue
        changed = want.differences(observed[key])
        if set(changed) & want.immutable:
            replaced.add(key)
        elif changed:
            updates[key] = changed
    gone = {k for k, o in observed.items() if owned.owns(o) and k not in desired} | replaced
    # LIO takes these with the object: a backstore's LUNs, a LUN's mapped LUNs.  A
    # backstore a foreign LUN uses is kept (or, if it must change, the plan refused).
    for key in [k for k in gone if k[0] == "backstore"]:
        users = [lun for lun in observed.all(Lun)
                 if (lun.plugin, lun.backstore) == ("user", key[1])]
        foreign = [lun for lun in users if not owned.owns(lun)]
        if foreign and key in replaced:
            raise PlanConflict(
                f"backstore user:evlu/{key[1]} must be re-created, but LUN {foreign[0].lun} of "
                f"target {foreign[0].iqn} (not in the configuration) uses it")
        if foreign:
            gone.discard(key)
            continue
        for lun in users:
            gone.add(lun.key)
            if lun.key in desired:
                replaced.add(lun.key)
    for key in [k for k in gone if k[0] == "lun"]:
        for mlun in observed.all(MappedLun):
            if (mlun.iqn, mlun.tag, mlun.tpg_lun) == key[1:]:
                gone.add(mlun.key)
                if mlun.key in desired:
                    replaced.add(mlun.key)
    for key in replaced:
        updates.pop(key, None)
    order = {kind: i for i, kind in enumerate(KINDS)}
    changes = [Change("delete", observed[k])
               for k in sorted(gone, key=lambda k: (-order[k[0]], _sortable(k)))]
    for key in sorted(desired, key=lambda k: (order[k[0]], _sortable(k))):
        want = desired[key]
        if key in gone or key not in observed:
            changes.append(Change("create", want))
        elif key in updates:
            changes.append(Change("update", want, _only_set(observed[key], want), updates[key]))
    return changes


def _only_set(observed: Obj, desired: Obj) -> Obj:
    """``observed`` with just the attributes ``desired`` sets (an update's inverse
    then restores exactly those)."""
    if not hasattr(desired, "attributes"):
        return observed
    have = dict(getattr(observed, "attributes"))
    keep = tuple((k, have[k]) for k, _ in getattr(desired, "attributes") if k in have)
    return replace(observed, attributes=keep)


def _sortable(key: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(f"{p:08d}" if isinstance(p, int) else str(p) for p in key)


def apply_to(state: State, changes: Iterable[Change]) -> State:
    """``state`` after ``changes`` (what the kernel should show once they are applied)."""
    out = State(state)
    for change in changes:
        if change.action == "delete":
            out.pop(change.obj.key, None)
        elif change.action == "create":
            out[change.obj.key] = change.obj
        else:
            have = out[change.obj.key]
            values = {f: getattr(change.obj, f) for f in change.fields}
            if "attributes" in values:
                merged = dict(getattr(have, "attributes")) | dict(values["attributes"])
                values["attributes"] = tuple(sorted(merged.items()))
            out[change.obj.key] = replace(have, **values)
    return out
