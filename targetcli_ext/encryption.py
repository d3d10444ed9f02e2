"""The /encryption node: every eVLU gatewayd serves, its state and keys, and the
commands that create, re-key, bind, shred and unencrypt them."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterable
from typing import Any

from configshell_fb import ExecutionError
from targetcli.ui_backstore import complete_path
from targetcli.ui_node import UINode

from gateway import format as fmt
from gateway.backstore import BackstoreError, open_backstore
from gateway.cli.sizes import parse_size
from gateway.kms import Config
from gateway.kms.audit import read_recent

from gateway.lio.reconcile import read_backing
from gateway.tcmu import cfgstring

from . import admin, stock
from .control import Gatewayd
from .inventory import STATES, Evlu, Exports, human_size

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_YES = ("yes", "true", "1")
KEY_WAIT = 30.0  # seconds a command waits for gatewayd's key lookup after a change


def _matches(options: Iterable[str], text: str) -> list[str]:
    """Completions of ``text`` among ``options`` (a single one ends with a space)."""
    found = sorted(o for o in options if o.startswith(text))
    return [found[0] + " "] if len(found) == 1 else found


def _confirmed(confirm: str | None) -> bool:
    return (confirm or "").lower() in _YES


class UIEvlu(UINode):
    """One eVLU: its state, key bindings, size and the LUNs that export it."""

    def __init__(self, evlu: Evlu, parent: UIEncryption) -> None:
        super().__init__(evlu.name, parent)
        self.evlu = evlu

    def summary(self) -> tuple[str, bool | None]:
        ok = {"ENCRYPTED": True, "UNENCRYPTED": None}.get(self.evlu.state, False)
        return self.evlu.summary(), ok

    def ui_command_info(self) -> None:
        """
        Shows everything known of this eVLU: state and why, backing store,
        volume UUID, key bindings (key id and KMS profile), capacity, sector
        size and the LUNs that export it.
        """
        for line in info_lines(self.evlu):
            self.shell.con.display(line)


def info_lines(e: Evlu) -> list[str]:
    """The ``info`` text of one eVLU."""
    lines = [f"name: {e.name}", f"backing store: {e.path}",
             f"state: {e.state}" + (f" ({e.reason})" if e.reason else ""),
             f"volume UUID: {e.uuid or '-'}"]
    lines += [f"key: {b.key_id} (KMS profile {b.kms})" for b in e.bindings] or ["key: none"]
    lines.append("capacity: " + (f"{e.capacity} bytes ({human_size(e.capacity)})"
                                 if e.capacity is not None else "?"))
    lines.append(f"sector size: {e.sector_size or '-'}")
    lines += [f"exported: {x}" for x in e.exports] or ["exported: no LUN"]
    return lines


class UIEncryption(UINode):
    """
    The encrypted virtual LUNs (eVLUs) of this gateway: LUNs served by gatewayd
    from backing stores with a LUKS2 header that names a key in a KMIP key
    manager. 'ls' shows each with its state, key, size and exports; 'help'
    lists the commands.
    """

    def __init__(self, parent: UINode, gatewayd: Gatewayd, exports: Exports,
                 lio: stock.RtsSteps | None = None) -> None:
        super().__init__("encryption", parent)
        self.gatewayd = gatewayd
        self.exports = exports
        self.lio = lio  # stock backstores for 'encrypt' (None: no LIO here)
        self.problem = ""
        self.refresh()

    # -- the tree -------------------------------------------------------------

    def refresh(self) -> None:
        self._children = set()
        try:
            evlus = self.gatewayd.evlus(self.exports)
        except ExecutionError as exc:
            self.problem = str(exc)
            return
        self.problem = ""
        for e in evlus:
            UIEvlu(e, self)

    def summary(self) -> tuple[str, bool | None]:
        if self.problem:
            return self.problem, False
        evlus = self._evlus()
        counts = ", ".join(f"{n} {s}" for s in STATES
                           if (n := sum(e.state == s for e in evlus)))
        healthy = all(e.state in ("ENCRYPTED", "UNENCRYPTED") for e in evlus)
        return f"eVLUs: {len(evlus)}" + (f" ({counts})" if counts else ""), healthy

    def _evlus(self) -> list[Evlu]:
        return sorted((c.evlu for c in self.children), key=lambda e: e.name)

    def _get(self, name: str) -> Evlu:
        self.refresh()
        if self.problem:
            raise ExecutionError(self.problem)
        for e in self._evlus():
            if e.name == name:
                return e
        names = ", ".join(e.name for e in self._evlus()) or "none yet ('create' makes one)"
        raise ExecutionError(f"no eVLU named {name!r}; eVLUs: {names}")

    def _names(self) -> list[str]:
        return [c.name for c in self.children]

    def _rescan(self, e: Evlu, **params: Any) -> None:
        """Have gatewayd re-read ``e``'s header; wait up to KEY_WAIT s for its key lookup."""
        self.gatewayd.call("rescan", lun=e.name, **params)
        deadline = time.monotonic() + KEY_WAIT
        while (now := self._get(e.name)).state == "WAITING_FOR_KEY" \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        self.shell.log.info(f"{now.name}: {now.state}" + (f" ({now.reason})" if now.reason else ""))

    # -- reading ----------------------------------------------------------------

    def ui_command_status(self) -> None:
        """
        Shows one line per eVLU: name, state, key id, KMS profile, capacity,
        sector size and exporting LUNs. For scripts:
        targetcli-evlu /encryption status
        """
        self.refresh()
        if self.problem:
            raise ExecutionError(self.problem)
        rows = [("NAME", "STATE", "KEY ID", "KMS", "SIZE", "SECTOR", "EXPORTED AS")]
        for e in self._evlus():
            rows.append((e.name, e.state, ",".join(e.key_ids) or "-",
                         ",".join(sorted({b.kms for b in e.bindings})) or "-",
                         human_size(e.capacity) if e.capacity is not None else "?",
                         str(e.sector_size or "-"), ",".join(e.exports) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            self.shell.con.display("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

    def ui_command_info(self, name: str) -> None:
        """
        Shows everything known of the eVLU NAME: state and why, backing store,
        volume UUID, key bindings, capacity, sector size, exporting LUNs.
        """
        for line in info_lines(self._get(name)):
            self.shell.con.display(line)

    def ui_command_audit(self, name: str | None = None, count: str = "20") -> None:
        """
        Shows the last COUNT entries of the key audit log (provision, lookup,
        rotate, bind, unbind, destroy, ...), only those of eVLU NAME if given.
        """
        try:
            limit = int(count)
        except ValueError:
            raise ExecutionError(f"count must be a number, not {count!r}") from None
        volume = self._get(name).uuid if name else None
        path = Config().audit_path
        records = read_recent(path, limit, volume=volume)
        if not records:
            self.shell.log.info(f"no audit entries in {path}")
        for r in records:
            fields = " ".join(f"{k}={r[k]}" for k in ("volume", "key_id", "kms") if k in r)
            extra = " ".join(f"{k}={v}" for k, v in r.items()
                             if k not in ("time", "gateway", "event", "outcome", "volume",
                                          "key_id", "kms"))
            self.shell.con.display(f"{r.get('time')} {r.get('gateway')} {r.get('event')} "
                                   f"{r.get('outcome')} {fields} {extra}".rstrip())

    # -- changing ---------------------------------------------------------------

    def ui_command_create(self, name: str, file_or_dev: str, size: str | None = None,
                          sector_size: str = "512", kms: str | None = None,
                          target: str | None = None, wipe: str = "yes") -> None:
        """
        Creates the eVLU NAME on FILE_OR_DEV: a new key in the KMS (profile KMS,
        default: the default profile), a LUKS2 header naming it, the data area
        zeroed (wipe=no skips it), and a user:evlu backstore served by gatewayd.
        A file that does not exist is created with SIZE (e.g. 10G). With
        target=IQN the LUN is also mapped to that iSCSI target in one step.
        SECTOR_SIZE (512 or 4096) is the LUN's block size.

        EXAMPLE
        =======
        create lun0 /var/lib/evlu/lun0.img 10G target=iqn.2003-01.org.example:t1
        """
        self.assert_root()
        if not _NAME.fullmatch(name):
            raise ExecutionError(f"invalid name {name!r}: letters, digits, '_', '.', '-' "
                                 "(at most 63, starting with a letter or digit)")
        if name in self._names():
            raise ExecutionError(f"an eVLU named {name!r} exists already ('info {name}')")
        if sector_size not in ("512", "4096"):
            raise ExecutionError(f"sector_size is 512 or 4096, not {sector_size!r}")
        path = os.path.abspath(file_or_dev)
        created = self._create_file(path, size)
        argv = ["format", path, "--sector-size", sector_size, "--quiet", "--kms", kms or ""]
        if wipe.lower() not in _YES:
            argv.append("--no-wipe")
        try:
            admin.evlu(*argv)
        except ExecutionError:
            if created:
                os.unlink(path)
            raise
        params: dict[str, Any] = {"name": name, "path": path, "wait": KEY_WAIT}
        if target:
            params["target"] = target
        added = self.gatewayd.call("lun.add", **params)
        self.refresh()
        e = self._get(name)
        self.shell.log.info(f"Created eVLU {name}: {e.summary()}")
        if target and not added.get("exported"):
            self.shell.log.warning(
                f"gatewayd did not export it ({added.get('lio')}); map it with "
                f"'/backstores/user:evlu create {name} {e.capacity} evlu/{path}' and "
                f"'/iscsi/{target}/tpg1/luns create /backstores/user:evlu/{name}'")

    def _create_file(self, path: str, size: str | None) -> bool:
        """Create ``path`` with ``size`` if it does not exist; True when created."""
        try:
            nbytes = None if size is None else parse_size(size)
        except ValueError as exc:
            raise ExecutionError(f"size: {exc}") from None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if nbytes is None:
                raise ExecutionError(f"{path} does not exist: give its size to create it "
                                     "(e.g. 'size=10G')") from None
            try:
                with open(path, "xb") as f:
                    f.truncate(nbytes)
            except OSError as exc:
                raise ExecutionError(f"cannot create {path}: {exc.strerror}") from None
            return True
        if nbytes is not None and stat.S_ISREG(st.st_mode) and nbytes != st.st_size:
            raise ExecutionError(f"{path} exists with another size; leave size out to use it "
                                 "as it is")
        return False

    def ui_command_encrypt(self, name: str, confirm: str | None = None,
                           kms: str | None = None) -> None:
        """
        Turns a plain backstore into an eVLU: a new key in the KMS (profile
        KMS, default: the default profile), a LUKS2 header over the first
        16 MiB of its file or device, the rest zeroed. Its current data becomes
        unreadable for good, hence confirm=yes. Copy the data out first if you
        need it, and back in through an initiator after.

        NAME is a plain (UNENCRYPTED) eVLU, or a stock fileio or block
        backstore, named fileio/NAME or block/NAME (a bare NAME when no eVLU
        and no other backstore has that name). A stock backstore is replaced
        by the user:evlu backstore NAME on the same file or device, served by
        gatewayd, with the same block size; every LUN that exported it (same
        LUN number and alias) and every ACL mapped LUN (same number and
        write protection) is re-created on it, so initiators find the LUN
        where it was, blank and 16 MiB smaller. If a step fails, the command
        says what state things are in; when the format did not happen, the
        stock backstore and its exports are put back. 'saveconfig' keeps the
        result, like any targetcli change.

        EXAMPLE
        =======
        encrypt fileio/disk1 confirm=yes
        """
        self.assert_root()
        self.refresh()
        if self.problem:
            raise ExecutionError(self.problem)
        snapshot = self.lio.observe() if self.lio else None
        source = stock.resolve(name, self._names(), snapshot)
        if source is not None:
            assert snapshot is not None and self.lio is not None
            evlus = {e.name: e.path for e in self._evlus()}
            self._encrypt_stock(stock.plan(source, snapshot, evlus), self.lio, confirm, kms)
            return
        e = self._get(name)
        if e.state != "UNENCRYPTED":
            raise ExecutionError(f"{name} is {e.state}, not a plain backstore: nothing to "
                                 "encrypt ('rotate' changes its key)")
        if not _confirmed(confirm):
            raise ExecutionError(f"encrypting {name} makes its current data on {e.path} "
                                 "unreadable for good; repeat with confirm=yes")
        admin.evlu("format", e.path, "--yes", "--quiet", "--kms", kms or "")
        self._rescan(e)

    def _encrypt_stock(self, plan: stock.Plan, lio: stock.RtsSteps, confirm: str | None,
                       kms: str | None) -> None:
        """Remove the stock backstore, format its store, serve it as user:evlu, re-export."""
        src = plan.source
        if not _confirmed(confirm):
            exported = ", ".join(str(x) for x in plan.luns) or "no LUN"
            raise ExecutionError(
                f"encrypting {src.qualified} makes the data on {src.path} unreadable for good "
                f"(it becomes a blank eVLU of {human_size(plan.capacity)}, exported where "
                f"{src.qualified} is: {exported}); repeat with confirm=yes")
        lio.remove(plan)
        try:
            try:
                admin.evlu("format", src.path, "--yes", "--quiet", "--kms", kms or "",
                           "--sector-size", str(src.block_size))
            except ExecutionError as exc:
                raise ExecutionError(self._format_failed(plan, lio, str(exc))) from None
            self._serve_stock(plan, lio)
        finally:
            self._refresh_tree()

    def _format_failed(self, plan: stock.Plan, lio: stock.RtsSteps, error: str) -> str:
        """What went wrong and what state things are in now that the format failed."""
        src = plan.source
        try:
            with open_backstore(src.path, readonly=True) as dev:
                formatted = fmt.probe(dev)
        except BackstoreError as exc:
            formatted, error = True, f"{error}; and {src.path} cannot be read now: {exc}"
        if not formatted:
            failed = lio.restore(plan)
            if not failed:
                return (f"{src.path} was not formatted: {error}. {src.qualified} and its "
                        f"{len(plan.exports)} export(s) are back as they were")
            return (f"{src.path} was not formatted: {error}. These could not be put back: "
                    + stock.failures(failed, f"/backstores/{src.qualified}"))
        evlu = f"/backstores/user:evlu/{src.name}"
        return (f"formatting {src.path} failed after it began writing: {error}. Its old data is "
                f"gone, so {src.qualified} was not put back; these exports are missing: "
                + ", ".join(str(x) for x in plan.exports) + f". Retry with 'evlu format "
                f"{src.path} --force --yes', then '/backstores/user:evlu create {src.name} "
                f"{plan.capacity} {cfgstring.SUBTYPE}/{src.path}' and: "
                + "; ".join(stock.commands(plan.exports, evlu)))

    def _serve_stock(self, plan: stock.Plan, lio: stock.RtsSteps) -> None:
        """The formatted store as a user:evlu backstore with the stock one's exports."""
        src = plan.source
        evlu = f"/backstores/user:evlu/{src.name}"
        try:
            backing = read_backing(src.path, src.block_size)
            lio.create_evlu(plan, backing.size, backing.uuid or "")
        except Exception as exc:  # rtslib: RTSLibError, OSError; the header: FormatError
            raise ExecutionError(
                f"{src.path} is now an eVLU, but its user:evlu backstore could not be made: "
                f"{exc}. None of the {len(plan.exports)} export(s) of {src.qualified} is "
                f"re-created; finish with '/backstores/user:evlu create {src.name} "
                f"{plan.capacity} {cfgstring.SUBTYPE}/{src.path}' and: "
                + "; ".join(stock.commands(plan.exports, evlu))) from None
        done, failed = lio.export(plan, "user", src.name)
        e = self._served(src.path)
        self.shell.log.info(f"{src.qualified} is now eVLU {e.name if e else src.name} on "
                            f"{src.path}: " + (e.summary() if e else "not served by gatewayd "
                                                "(see 'evlu lun list' and gatewayd's log)"))
        for x in done:
            self.shell.log.info(f"re-created {x}" + (f" -> user/{src.name}"
                                                     if isinstance(x, stock.LunExport) else ""))
        if failed:
            raise ExecutionError("could not re-create " + stock.failures(failed, evlu))

    def _served(self, path: str) -> Evlu | None:
        """gatewayd's eVLU on ``path`` once its key lookup is over (KEY_WAIT s at most)."""
        real = os.path.realpath(path)
        deadline = time.monotonic() + KEY_WAIT
        while True:
            found = next((e for e in self.gatewayd.evlus(self.exports)
                          if os.path.realpath(e.path) == real), None)
            if (found is not None and found.state != "WAITING_FOR_KEY") \
                    or time.monotonic() >= deadline:
                return found
            time.sleep(0.2)

    def _refresh_tree(self) -> None:
        """Show LIO as it is now in the stock targetcli nodes too."""
        for node in self.get_root().children:
            if node is not self and isinstance(node, UINode):
                node.refresh()
        self.refresh()

    def ui_command_off(self, name: str, confirm: str | None = None) -> None:
        """
        Removes encryption from eVLU NAME: every key binding and the LUKS2
        header go, and the LUN is served plain from then on. Its data becomes
        unreadable for good, hence confirm=yes.
        """
        self.assert_root()
        e = self._get(name)
        if not _confirmed(confirm):
            raise ExecutionError(f"'off' removes the header and key bindings of {name}: its "
                                 "data becomes unreadable for good; repeat with confirm=yes")
        admin.evlu("off", e.path, "--confirm")
        self._rescan(e, accept_plain=True)

    def ui_command_rescan(self, name: str | None = None) -> None:
        """
        Makes gatewayd re-read the header of eVLU NAME (every eVLU without
        NAME): a replica that finished syncing, a key changed underneath, a
        KMS that answers again.
        """
        if name is None:
            self.gatewayd.call("rescan")
            self.refresh()
            self.ui_command_status()
            return
        self._rescan(self._get(name))

    def ui_command_rotate(self, name: str, kms: str | None = None) -> None:
        """
        Re-keys eVLU NAME: a new key in the KMS (profile KMS, default: the
        current key's), the data key re-wrapped under it (no data rewrite),
        the old key deactivated. Replicas made before open again only once
        re-synced.
        """
        self.assert_root()
        e = self._get(name)
        admin.evlu("rotate", e.path, *(["--kms", kms] if kms else []))
        self._rescan(e)

    def ui_command_bind(self, name: str, kms: str) -> None:
        """
        Adds a binding of eVLU NAME to a new key in a second KMS (profile KMS,
        e.g. a DR site's), so gateways of that site open it and its replicas.
        """
        self.assert_root()
        e = self._get(name)
        admin.evlu("bind", e.path, "--kms", kms)
        self._rescan(e)

    def ui_command_unbind(self, name: str, key_id: str) -> None:
        """
        Removes the binding of eVLU NAME to KEY_ID (never the last one). The
        key stays in its KMS; 'shred' destroys keys.
        """
        self.assert_root()
        e = self._get(name)
        admin.evlu("unbind", e.path, "--key-id", key_id)
        self._rescan(e)

    def ui_command_shred(self, name: str, confirm: str | None = None) -> None:
        """
        Crypto-shreds eVLU NAME: destroys its key(s) in the KMS, so the volume
        and every copy and replica of it become unreadable everywhere, for
        good; hence confirm=yes.
        """
        self.assert_root()
        e = self._get(name)
        if not _confirmed(confirm):
            raise ExecutionError(f"shredding {name} destroys key(s) {', '.join(e.key_ids)}: "
                                 "it and every replica become unreadable for good; repeat "
                                 "with confirm=yes")
        admin.evlu("shred", e.path, "--yes")
        self.gatewayd.call("lun.drop_key", lun=e.name, reason="its key was destroyed (shred)")
        self._rescan(e)

    # -- completion -------------------------------------------------------------

    def _complete(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        if current_param == "name":
            return _matches(self._names(), text)
        if current_param == "file_or_dev":
            return complete_path(text, lambda m: stat.S_ISREG(m) or stat.S_ISBLK(m))
        if current_param == "kms":
            return _matches(Config().profile_names(), text)
        if current_param == "sector_size":
            return _matches(("512", "4096"), text)
        if current_param in ("confirm", "wipe"):
            return _matches(("yes", "no"), text)
        if current_param == "key_id" and parameters.get("name") in self._names():
            return _matches(self._get(parameters["name"]).key_ids, text)
        if current_param == "target":
            return _matches(self._targets(), text)
        return []

    def _targets(self) -> list[str]:
        """iSCSI targets of this host (from configfs; none off the appliance)."""
        try:
            names = os.listdir("/sys/kernel/config/target/iscsi")
        except OSError:
            return []
        return [n for n in names if n.startswith(("iqn.", "eui.", "naa."))]

    def ui_complete_info(self, parameters: dict[str, str], text: str,
                         current_param: str) -> list[str]:
        return self._complete(parameters, text, current_param)

    def ui_complete_encrypt(self, parameters: dict[str, str], text: str,
                            current_param: str) -> list[str]:
        if current_param != "name":
            return self._complete(parameters, text, current_param)
        plain = [e.name for e in self._evlus() if e.state == "UNENCRYPTED"]
        snapshot = self.lio.observe() if self.lio else stock.Snapshot()
        return _matches(plain + [so.qualified for so in snapshot.storage_objects
                                 if so.plugin in stock.STOCK], text)

    ui_complete_audit = ui_complete_off = ui_complete_info
    ui_complete_rescan = ui_complete_rotate = ui_complete_bind = ui_complete_info
    ui_complete_unbind = ui_complete_shred = ui_complete_create = ui_complete_info
