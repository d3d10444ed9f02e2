"""LIO through rtslib-fb: observe configfs as a :class:`State`, execute one :class:`Change`.

Each change is all or nothing: a step that fails undoes what the change had
already done (a created object is deleted again, written values restored)
before the error propagates.  rtslib-fb is imported from ``rtslib_fb`` only,
as targetcli-fb does (``rtslib`` may be a distinct copy with distinct classes).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from rtslib_fb import (LUN, TPG, FabricModule, MappedLUN, NetworkPortal, NodeACL, RTSRoot,
                       RTSLibError, Target, UserBackedStorageObject, tcm)

from . import state as st
from .state import Auth, Change, State

log = logging.getLogger(__name__)
Undo = list[Callable[[], None]]
_AUTH = ("userid", "password", "mutual_userid", "mutual_password")


def _no_listener(exc: RTSLibError) -> bool:
    """Whether the kernel refused an attribute because no TCMU handler listens (ESRCH)."""
    cause = exc.__context__
    return isinstance(cause, OSError) and cause.errno == errno.ESRCH


def _read_auth(node: Any, prefix: str = "chap_") -> Auth:
    return Auth(*((getattr(node, prefix + name, None) or "") for name in _AUTH))


def _attributes(node: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for name in node.list_attributes(readable=True):
        try:
            out.append((name, node.get_attribute(name)))
        except Exception:  # an attribute the running kernel refuses to show
            continue
    return tuple(out)


def _private(node: Any, prefix: str) -> None:
    """Make the node's CHAP password files root-only (the kernel creates them 0644)."""
    base = f"{node.path}/{'discovery_auth' if prefix == 'discovery_' else 'auth'}"
    for name in ("password", "password_mutual"):
        try:
            os.chmod(f"{base}/{name}", 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("lio: cannot make %s/%s root-only: %s", base, name, exc.strerror)


class RtsLio:
    """The kernel's LIO configuration (configfs) through rtslib-fb."""

    def __init__(self) -> None:
        self.root = RTSRoot()
        self.iscsi = FabricModule("iscsi")

    # -- observe ------------------------------------------------------------------

    def observe(self) -> State:
        tcm.bs_cache.clear()   # rtslib caches backstore indexes per process: other tools add some
        objects: list[st.Obj] = []
        for so in self.root.storage_objects:
            if so.plugin == "user":
                objects.append(st.Backstore(
                    so.name, so.config or "", so.size, int(so.get_attribute("hw_block_size")),
                    so.wwn, so.hw_max_sectors, int(so.get_attribute("nl_reply_supported")),
                    so.get_attribute("emulate_write_cache") == "1"))
        for target in self.iscsi.targets:
            iqn = target.wwn
            objects.append(st.Target(iqn))
            for tpg in target.tpgs:
                tag = tpg.tag
                objects.append(st.Tpg(iqn, tag, _attributes(tpg), _read_auth(tpg)))
                if tpg.enable:
                    objects.append(st.Enable(iqn, tag))
                objects += [st.Portal(iqn, tag, p.ip_address, p.port)
                            for p in tpg.network_portals]
                for lun in tpg.luns:
                    so = lun.storage_object
                    objects.append(st.Lun(iqn, tag, lun.lun, so.name, so.plugin))
                for acl in tpg.node_acls:
                    objects.append(st.Acl(iqn, tag, acl.node_wwn, _attributes(acl),
                                          _read_auth(acl)))
                    objects += [st.MappedLun(iqn, tag, acl.node_wwn, m.mapped_lun,
                                             m.tpg_lun.lun, m.write_protect)
                                for m in acl.mapped_luns]
        if self.iscsi.exists:
            objects.append(st.Discovery(self.iscsi.discovery_enable_auth,
                                        _read_auth(self.iscsi, "discovery_")))
        else:
            objects.append(st.Discovery())
        return State.of(objects)

    # -- execute ------------------------------------------------------------------

    def execute(self, change: Change) -> None:
        """Make one change, entirely or not at all."""
        undo: Undo = []
        try:
            getattr(self, f"_{change.action}_{change.obj.kind}")(change.obj, change.old, undo)
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:  # the change's own error is the one to report
                    pass
            raise

    def _tpg(self, obj: Any) -> TPG:
        return TPG(Target(self.iscsi, obj.iqn, "lookup"), obj.tag, "lookup")

    def _acl(self, obj: Any) -> NodeACL:
        return NodeACL(self._tpg(obj), obj.initiator, "lookup")

    @staticmethod
    def _set(node: Any, name: str, value: Any, old: Any,
             undo: Undo) -> None:
        setattr(node, name, value)
        undo.append(lambda: setattr(node, name, old))

    def _set_auth(self, node: Any, new: Auth, old: Auth, undo: Undo,
                  prefix: str = "chap_") -> None:
        _private(node, prefix)
        for name in _AUTH:
            if getattr(new, name) != getattr(old, name):
                self._set(node, prefix + name, getattr(new, name), getattr(old, name), undo)

    @staticmethod
    def _set_attributes(node: Any, new: tuple[tuple[str, str], ...],
                        old: tuple[tuple[str, str], ...], undo: Undo) -> None:
        before = dict(old)
        for name, value in new:
            if before.get(name) != value:
                previous = before.get(name)
                node.set_attribute(name, value)
                if previous is not None:
                    undo.append(lambda n=name, v=previous: node.set_attribute(n, v))

    # backstores
    def _create_backstore(self, obj: Any, old: Any, undo: Undo) -> None:
        so = UserBackedStorageObject(
            obj.name, config=obj.config, size=obj.size, wwn=obj.serial,
            hw_max_sectors=obj.hw_max_sectors,
            control=f"nl_reply_supported={obj.nl_reply_supported},hw_block_size={obj.block_size}")
        undo.append(so.delete)
        if obj.write_cache:
            try:
                so.set_attribute("emulate_write_cache", "1")
            except RTSLibError as exc:
                if not _no_listener(exc):
                    raise
                # rtslib enables a device as it creates it; from then on the kernel passes
                # this change to the handler, and refuses it while none listens (evlu lio
                # boot runs before gatewayd, whose apply at start then sets it)
                log.warning("backstore %s: write cache left off until the user:evlu handler "
                            "runs (gatewayd switches it on when it starts)", obj.name)

    def _delete_backstore(self, obj: Any, old: Any, undo: Undo) -> None:
        UserBackedStorageObject(obj.name).delete()

    def _update_backstore(self, obj: Any, old: Any, undo: Undo) -> None:
        so = UserBackedStorageObject(obj.name)
        for name, attribute in (("size", "dev_size"), ("nl_reply_supported", "nl_reply_supported"),
                                ("write_cache", "emulate_write_cache")):
            new, previous = getattr(obj, name), getattr(old, name)
            if new != previous:
                try:
                    so.set_attribute(attribute, str(int(new)))
                except RTSLibError as exc:
                    if _no_listener(exc):
                        raise RTSLibError(f"{exc} (the kernel passes a change of {attribute} "
                                          "to the user:evlu handler, and none is listening: "
                                          "start gatewayd, then apply again)") from exc
                    raise
                undo.append(lambda a=attribute, v=str(int(previous)): so.set_attribute(a, v))

    # targets, TPGs, portals
    def _create_target(self, obj: Any, old: Any, undo: Undo) -> None:
        undo.append(Target(self.iscsi, obj.iqn, "create").delete)

    def _delete_target(self, obj: Any, old: Any, undo: Undo) -> None:
        Target(self.iscsi, obj.iqn, "lookup").delete()

    def _create_tpg(self, obj: Any, old: Any, undo: Undo) -> None:
        tpg = TPG(Target(self.iscsi, obj.iqn, "lookup"), obj.tag, "create")
        undo.append(tpg.delete)
        self._set_attributes(tpg, obj.attributes, (), undo)
        self._set_auth(tpg, obj.auth, Auth(), undo)

    def _update_tpg(self, obj: Any, old: Any, undo: Undo) -> None:
        tpg = self._tpg(obj)
        self._set_attributes(tpg, obj.attributes, old.attributes, undo)
        self._set_auth(tpg, obj.auth, old.auth, undo)

    def _delete_tpg(self, obj: Any, old: Any, undo: Undo) -> None:
        self._tpg(obj).delete()

    def _create_enable(self, obj: Any, old: Any, undo: Undo) -> None:
        tpg = self._tpg(obj)
        self._set(tpg, "enable", True, False, undo)

    def _delete_enable(self, obj: Any, old: Any, undo: Undo) -> None:
        tpg = self._tpg(obj)
        self._set(tpg, "enable", False, True, undo)

    def _create_portal(self, obj: Any, old: Any, undo: Undo) -> None:
        undo.append(NetworkPortal(self._tpg(obj), obj.ip, obj.port, "create").delete)

    def _delete_portal(self, obj: Any, old: Any, undo: Undo) -> None:
        NetworkPortal(self._tpg(obj), obj.ip, obj.port, "lookup").delete()

    # LUNs, ACLs, mapped LUNs
    def _create_lun(self, obj: Any, old: Any, undo: Undo) -> None:
        so = UserBackedStorageObject(obj.backstore)
        undo.append(LUN(self._tpg(obj), obj.lun, storage_object=so).delete)

    def _delete_lun(self, obj: Any, old: Any, undo: Undo) -> None:
        LUN(self._tpg(obj), obj.lun).delete()

    def _create_acl(self, obj: Any, old: Any, undo: Undo) -> None:
        acl = NodeACL(self._tpg(obj), obj.initiator, "create")
        undo.append(acl.delete)
        self._set_attributes(acl, obj.attributes, (), undo)
        self._set_auth(acl, obj.auth, Auth(), undo)

    def _update_acl(self, obj: Any, old: Any, undo: Undo) -> None:
        acl = self._acl(obj)
        self._set_attributes(acl, obj.attributes, old.attributes, undo)
        self._set_auth(acl, obj.auth, old.auth, undo)

    def _delete_acl(self, obj: Any, old: Any, undo: Undo) -> None:
        self._acl(obj).delete()

    def _create_mapped_lun(self, obj: Any, old: Any, undo: Undo) -> None:
        undo.append(MappedLUN(self._acl(obj), obj.mapped_lun, obj.tpg_lun,
                              obj.write_protect).delete)

    def _update_mapped_lun(self, obj: Any, old: Any, undo: Undo) -> None:
        self._set(MappedLUN(self._acl(obj), obj.mapped_lun), "write_protect", obj.write_protect,
                  old.write_protect, undo)

    def _delete_mapped_lun(self, obj: Any, old: Any, undo: Undo) -> None:
        MappedLUN(self._acl(obj), obj.mapped_lun).delete()

    # discovery authentication: credentials before enforcing, enforcement off before clearing
    def _update_discovery(self, obj: Any, old: Any, undo: Undo) -> None:
        if not obj.enable and old.enable:
            self._set(self.iscsi, "discovery_enable_auth", False, True, undo)
        self._set_auth(self.iscsi, obj.auth, old.auth, undo, "discovery_")
        if obj.enable and not old.enable:
            self._set(self.iscsi, "discovery_enable_auth", True, False, undo)
