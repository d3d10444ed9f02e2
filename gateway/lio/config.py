"""The LIO configuration: ``lio.toml`` (world-readable) and ``chap.toml`` (root only).

``lio.toml`` describes iSCSI targets, their TPGs, portals, LUNs (``user:evlu``
backstores), ACLs with mapped LUNs, and discovery authentication; CHAP
credentials are named there and live in ``chap.toml`` (mode 0600, refused
when group or others may access it).  :func:`load` validates both and raises
one :class:`ConfigError` listing every problem, each with its field path, e.g.
``targets[iqn.2003-01.org.example:t1].tpgs[1].acls[iqn.1993-08.org.debian:01:h1]
.mapped_luns[0].lun: no LUN 3 in this TPG``.  Secrets never appear in reprs
or messages.  :func:`dump`/:func:`save` write the same format back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ..tcmu.cfgstring import MAX_CFGSTRING, SUBTYPE

LIO_FILE = "lio.toml"
CHAP_FILE = "chap.toml"
DEFAULT_PORT = 3260
DEFAULT_PORTAL = f"0.0.0.0:{DEFAULT_PORT}"
BLOCK_SIZES = (512, 4096)
MAX_LUN = 65535          # LIO's TPG LUN index
MAX_MAPPED_LUN = 255     # rtslib's MappedLUN limit
MIN_SECRET = 12          # RFC 3720 section 8.2.1; the Microsoft initiator's minimum
MAX_CHAP = 255           # LIO stores at most 255 bytes
_IQN = re.compile(r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?"
                  r"(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[a-z0-9.:-]+)?")
_EUI = re.compile(r"eui\.[0-9a-f]{16}")
_NAA = re.compile(r"naa\.[125][0-9a-f]{15}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_CHAP_TEXT = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no whitespace
_ATTRIBUTE = re.compile(r"[a-z][a-z0-9_]*")


class ConfigError(Exception):
    """The configuration is invalid: ``problems`` holds one ``field: reason`` per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n"
                         + "\n".join(f"  {p}" for p in problems))


def config_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else ``$EVLU_CONFIG_DIR``, else /etc/evlu-gateway (as gateway.kms.config)."""
    from ..kms.config import DEFAULT_CONFIG_DIR
    return Path(root or os.environ.get("EVLU_CONFIG_DIR") or DEFAULT_CONFIG_DIR)


# -- the model ------------------------------------------------------------------

@dataclass(frozen=True)
class Chap:
    """One CHAP credential of chap.toml; ``mutual_*`` authenticate the target too."""

    name: str
    userid: str
    password: str = field(repr=False)
    mutual_userid: str = ""
    mutual_password: str = field(default="", repr=False)

    @property
    def mutual(self) -> bool:
        return bool(self.mutual_userid)


@dataclass(frozen=True)
class Portal:
    ip: str          # as configfs names it: IPv6 in brackets
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Lun:
    """A TPG LUN served by a ``user:evlu`` backstore over ``path``."""

    lun: int
    path: str
    block_size: int = 512
    kms: str | None = None
    plain: bool = False
    backstore: str | None = None   # default: derived from the path
    serial: str | None = None      # default: the eVLU's UUID
    write_cache: bool = False      # WCE: writes complete before they are durable

    @property
    def backstore_name(self) -> str:
        return self.backstore or backstore_name(self.path)

    @property
    def cfgstring(self) -> str:
        """The ``user:evlu`` configuration string, without the subtype."""
        return self.path + (";plain" if self.plain else "")


@dataclass(frozen=True)
class MappedLun:
    """TPG LUN ``lun`` as the initiator's LUN ``mapped_lun`` (default: the same number)."""

    lun: int
    mapped_lun: int | None = None
    write_protect: bool = False

    @property
    def index(self) -> int:
        return self.lun if self.mapped_lun is None else self.mapped_lun


@dataclass(frozen=True)
class Acl:
    initiator: str
    chap: Chap | None = None
    mapped_luns: tuple[MappedLun, ...] = ()
    attributes: dict[str, int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Tpg:
    tag: int = 1
    portals: tuple[Portal, ...] = (Portal("0.0.0.0"),)
    luns: tuple[Lun, ...] = ()
    acls: tuple[Acl, ...] = ()
    authentication: bool | None = None   # None: on when any ACL (or the TPG) has CHAP
    generate_node_acls: bool = False
    demo_mode_write_protect: bool = True
    chap: Chap | None = None             # for generated (demo-mode) ACLs
    enable: bool = True
    attributes: dict[str, int | str] = field(default_factory=dict)

    @property
    def enforces_auth(self) -> bool:
        if self.authentication is not None:
            return self.authentication
        return self.chap is not None or any(a.chap is not None for a in self.acls)


@dataclass(frozen=True)
class Target:
    iqn: str
    tpgs: tuple[Tpg, ...] = ()


@dataclass(frozen=True)
class Discovery:
    """SendTargets discovery authentication (the iSCSI fabric's discovery_auth)."""

    enable: bool = True
    chap: Chap | None = None


@dataclass(frozen=True)
class LioConfig:
    targets: tuple[Target, ...] = ()
    discovery: Discovery | None = None   # None: left as it is

    def credentials(self) -> dict[str, Chap]:
        """Every credential the configuration references, by name."""
        found: dict[str, Chap] = {}
        if self.discovery and self.discovery.chap:
            found[self.discovery.chap.name] = self.discovery.chap
        for target in self.targets:
            for tpg in target.tpgs:
                for chap in [tpg.chap] + [a.chap for a in tpg.acls]:
                    if chap is not None:
                        found[chap.name] = chap
        return found

    def luns(self) -> Iterator[tuple[str, Lun]]:
        for target in self.targets:
            for tpg in target.tpgs:
                for lun in tpg.luns:
                    yield f"targets[{target.iqn}].tpgs[{tpg.tag}].luns[{lun.lun}]", lun


def backstore_name(path: str) -> str:
    """A stable, LIO-safe backstore name for ``path``: its file name and a path hash."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path.rstrip("/")))[:40] or "evlu"
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def check_wwn(name: str) -> str | None:
    """Why ``name`` is not an iSCSI name rtslib accepts (IQN, EUI-64, NAA), or None."""
    if _IQN.fullmatch(name):
        return None if len(name) <= 223 else "longer than 223 bytes"
    if _EUI.fullmatch(name) or _NAA.fullmatch(name):
        return None
    if name.startswith("iqn."):
        return ("not an IQN: use iqn.YYYY-MM.reversed.domain[:unique], lower case letters, "
                "digits, '.', '-' and ':' (no '_')")
    if name.startswith("eui."):
        return "not an EUI-64 name: use eui. and 16 hex digits"
    if name.startswith("naa."):
        return "not an NAA name: use naa. and 16 hex digits starting with 1, 2 or 5"
    return "not an iSCSI name: use iqn.YYYY-MM.domain[:unique], eui.<16 hex> or naa.<16 hex>"


# -- parsing ----------------------------------------------------------------------

class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, why: str) -> None:
        self.items.append(f"{where}: {why}")


class _Table:
    """One TOML table being read: typed fields, unknown keys reported."""

    def __init__(self, doc: Any, where: str, problems: _Problems) -> None:
        self.where, self.problems = where, problems
        self.ok = isinstance(doc, dict)
        if not self.ok:
            problems.add(where, f"must be a table, not {_kind(doc)}")
        self.doc: dict[str, Any] = doc if self.ok else {}
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kinds: tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.doc:
            if required:
                self.problems.add(self.at(key), "required")
            return default
        value = self.doc[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(_TYPE_NAMES[k] for k in kinds)
            self.problems.add(self.at(key), f"must be {names}, not {_kind(value)}")
            return default
        return value

    def check(self, key: str, value: Any, why: str | None) -> bool:
        if why:
            self.problems.add(self.at(key), why)
        return not why

    def finish(self) -> None:
        for key in sorted(set(self.doc) - self.seen):
            self.problems.add(self.at(key), "unknown field")


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "an array",
               dict: "a table"}


def _kind(value: Any) -> str:
    for kind, name in ((bool, "true or false"), (str, "a string"), (int, "an integer"),
                       (float, "a number"), (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _in_range(low: int, high: int) -> Callable[[int], str | None]:
    return lambda v: None if low <= v <= high else f"must be {low} to {high}, not {v}"


def _entries(table: _Table, key: str, label: Callable[[_Table, int], str]
             ) -> Iterator[_Table]:
    """The tables of array ``key``, each named by ``label`` in error paths."""
    items = table.get(key, (list,), [])
    for i, item in enumerate(items):
        sub = _Table(item, f"{table.at(key)}[{i}]", table.problems)
        if sub.ok:
            sub.where = f"{table.at(key)}[{label(sub, i)}]"
            yield sub


def _keyed(field_name: str, default: Any = None) -> Callable[[_Table, int], str]:
    def label(sub: _Table, i: int) -> str:
        value = sub.doc.get(field_name, default)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return str(i)
        return str(value).lower() if isinstance(value, str) else str(value)
    return label


def _portal(text: str) -> Portal | str:
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if not match:
        return f"{text!r} is not IP[:PORT] (IPv6 in brackets)"
    host, port = match.group(1) or match.group(3), int(match.group(2) or match.group(4)
                                                       or DEFAULT_PORT)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host!r} is not an IP address (LIO listens on addresses, not names)"
    if not 0 < port < 65536:
        return f"port {port} out of range"
    return Portal(f"[{ip}]" if ip.version == 6 else str(ip), port)


def _attributes(table: _Table) -> dict[str, int | str]:
    attrs = table.get("attributes", (dict,), {})
    out: dict[str, int | str] = {}
    for name, value in attrs.items():
        where = f"{table.at('attributes')}.{name}"
        if not _ATTRIBUTE.fullmatch(name):
            table.problems.add(where, "not an attribute name")
        elif isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, (int, str)) and "\n" not in str(value):
            out[name] = value
        else:
            table.problems.add(where, f"must be an integer, a string or a boolean, "
                                      f"not {_kind(value)}")
    return out


class _Parser:
    def __init__(self, credentials: dict[str, Chap] | None) -> None:
        self.problems = _Problems()
        self.credentials = credentials
        self.references: dict[str, str] = {}   # credential name -> first field naming it

    def chap(self, table: _Table) -> Chap | None:
        name = table.get("chap", (str,))
        if name is None:
            return None
        self.references.setdefault(name, table.at("chap"))
        if self.credentials is None:
            return Chap(name, "", "")   # resolved once the secrets are loaded
        if name not in self.credentials:
            self.problems.add(table.at("chap"), f"no credential {name!r} in {CHAP_FILE}")
            return None
        return self.credentials[name]

    def config(self, doc: dict[str, Any]) -> LioConfig:
        top = _Table(doc, "", self.problems)
        discovery = None
        if "discovery" in doc:
            d = _Table(top.get("discovery", (dict,)), "discovery", self.problems)
            chap = self.chap(d)
            enable = d.get("enable", (bool,), chap is not None)
            if enable and chap is None and "chap" not in d.doc:
                self.problems.add("discovery.chap", "required when enable = true")
            d.finish()
            discovery = Discovery(enable, chap)
        targets = [self.target(t) for t in _entries(top, "targets", _keyed("iqn"))]
        top.finish()
        self.unique([t.iqn for t in targets], "targets", "target")
        return LioConfig(tuple(targets), discovery)

    def unique(self, keys: list[Any], where: str, what: str) -> None:
        for key in sorted({k for k in keys if keys.count(k) > 1}, key=str):
            self.problems.add(f"{where}[{key}]", f"{what} defined {keys.count(key)} times")

    def target(self, t: _Table) -> Target:
        iqn = t.get("iqn", (str,), "", required=True).lower()
        if iqn:
            t.check("iqn", iqn, check_wwn(iqn))
        tpgs = [self.tpg(g) for g in _entries(t, "tpgs", _keyed("tag", 1))]
        if "tpgs" not in t.doc:
            t.problems.add(t.at("tpgs"), "required: at least one TPG")
        t.finish()
        self.unique([g.tag for g in tpgs], t.at("tpgs"), "TPG")
        return Target(iqn, tuple(tpgs))

    def tpg(self, g: _Table) -> Tpg:
        tag = g.get("tag", (int,), 1)
        g.check("tag", tag, _in_range(1, 65535)(tag))
        portals = []
        for i, text in enumerate(g.get("portals", (list,), [DEFAULT_PORTAL])):
            parsed = _portal(text) if isinstance(text, str) else f"must be a string, not {_kind(text)}"
            if isinstance(parsed, str):
                g.problems.add(f"{g.at('portals')}[{i}]", parsed)
            else:
                portals.append(parsed)
        self.unique([str(p) for p in portals], g.at("portals"), "portal")
        luns = [self.lun(x) for x in _entries(g, "luns", _keyed("lun"))]
        self.unique([x.lun for x in luns], g.at("luns"), "LUN")
        numbers = {x.lun for x in luns}
        acls = [self.acl(a, numbers) for a in _entries(g, "acls", _keyed("initiator"))]
        self.unique([a.initiator for a in acls], g.at("acls"), "ACL")
        tpg = Tpg(tag=tag, portals=tuple(portals), luns=tuple(luns), acls=tuple(acls),
                  authentication=g.get("authentication", (bool,)),
                  generate_node_acls=g.get("generate_node_acls", (bool,), False),
                  demo_mode_write_protect=g.get("demo_mode_write_protect", (bool,), True),
                  chap=self.chap(g), enable=g.get("enable", (bool,), True),
                  attributes=_attributes(g))
        for name in ("authentication", "generate_node_acls", "demo_mode_write_protect"):
            if name in tpg.attributes:
                g.problems.add(f"{g.at('attributes')}.{name}", f"set it as the TPG field {name}")
        g.finish()
        return tpg

    def lun(self, x: _Table) -> Lun:
        number = x.get("lun", (int,), -1, required=True)
        if number != -1:
            x.check("lun", number, _in_range(0, MAX_LUN)(number))
        path = x.get("path", (str,), "", required=True)
        plain = x.get("plain", (bool,), False)
        if path:
            x.check("path", path, _check_path(path, plain))
        block_size = x.get("block_size", (int,), 512)
        x.check("block_size", block_size,
                None if block_size in BLOCK_SIZES else f"must be 512 or 4096, not {block_size}")
        kms = x.get("kms", (str,))
        if kms is not None:
            x.check("kms", kms, None if _NAME.fullmatch(kms) else "not a KMS profile name")
        name = x.get("backstore", (str,))
        if name is not None:
            x.check("backstore", name, None if _NAME.fullmatch(name) else
                    "use letters, digits, '.', '_' or '-', at most 63 characters")
        serial = x.get("serial", (str,))
        if serial is not None:
            x.check("serial", serial, None if _SERIAL.fullmatch(serial) else
                    "use letters, digits, '.', '_', ':' or '-', at most 64 characters")
        write_cache = x.get("write_cache", (bool,), False)
        x.finish()
        return Lun(number, path, block_size, kms, plain, name, serial, write_cache)

    def acl(self, a: _Table, luns: set[int]) -> Acl:
        initiator = a.get("initiator", (str,), "", required=True).lower()
        if initiator:
            a.check("initiator", initiator, check_wwn(initiator))
        mapped = []
        for i, m in enumerate(_entries(a, "mapped_luns", lambda _t, i: str(i))):
            lun = m.get("lun", (int,), -1, required=True)
            if lun != -1 and lun not in luns:
                m.problems.add(m.at("lun"), f"no LUN {lun} in this TPG")
            index = m.get("mapped_lun", (int,))
            if index is not None:
                m.check("mapped_lun", index, _in_range(0, MAX_MAPPED_LUN)(index))
            elif lun > MAX_MAPPED_LUN:
                m.problems.add(m.at("mapped_lun"), f"required: LUN {lun} is above "
                                                   f"{MAX_MAPPED_LUN}, the highest mapped LUN")
            mapped.append(MappedLun(lun, index, m.get("write_protect", (bool,), False)))
            m.finish()
        self.unique([m.index for m in mapped], a.at("mapped_luns"), "mapped LUN")
        acl = Acl(initiator, self.chap(a), tuple(mapped), _attributes(a))
        a.finish()
        return acl

    def consistency(self, config: LioConfig) -> None:
        """One backstore per path and one definition per backstore, across targets."""
        by_name: dict[str, tuple[str, Lun]] = {}
        by_path: dict[str, tuple[str, Lun]] = {}
        for where, lun in config.luns():
            if not lun.path:
                continue
            same = by_name.setdefault(lun.backstore_name, (where, lun))
            if same[1].path != lun.path:
                self.problems.add(where, f"backstore {lun.backstore_name!r} is also {same[0]} "
                                         f"over another path ({same[1].path})")
            elif _backstore_settings(same[1]) != _backstore_settings(lun):
                self.problems.add(where, f"same backstore as {same[0]}, but its "
                                         f"{', '.join(_BACKSTORE_SETTINGS[:-1])} or "
                                         f"{_BACKSTORE_SETTINGS[-1]} differ")
            first = by_path.setdefault(lun.path, (where, lun))
            if first[1].backstore_name != lun.backstore_name:
                self.problems.add(where, f"{lun.path} is also {first[0]} under backstore "
                                         f"{first[1].backstore_name!r}: one path, one backstore")


def _check_path(path: str, plain: bool) -> str | None:
    if not path.startswith("/"):
        return "must be an absolute path"
    if any(c in path for c in ",:") or any(c.isspace() for c in path):
        return "may not contain ',', ':' or white space (the kernel and rtslib split on them)"
    if len(f"{SUBTYPE}/{path}{';plain' if plain else ''}") > MAX_CFGSTRING:
        return f"too long for a TCMU configuration string ({MAX_CFGSTRING} bytes)"
    return None


# -- secrets ------------------------------------------------------------------------

def _read_toml(path: Path, problems: _Problems, what: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        problems.add(str(path), f"missing ({what})")
    except OSError as exc:
        problems.add(str(path), f"cannot read: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        problems.add(str(path), f"not valid TOML: {exc}")
    return None


def _check_private(path: Path) -> str | None:
    """Why the secrets file is not private to its owner, or None."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_mode & 0o077:
        return (f"mode {stat.S_IMODE(info.st_mode):04o} lets group or others access the CHAP "
                f"secrets; run 'chmod 600 {path}'")
    if info.st_uid not in (0, os.geteuid()):
        return f"owned by uid {info.st_uid}, neither root nor this user"
    return None


def load_secrets(path: str | os.PathLike[str]) -> dict[str, Chap]:
    """The credentials of ``chap.toml``, by name (refused unless mode 0600-like)."""
    path = Path(path)
    problems = _Problems()
    try:
        why = _check_private(path)
    except FileNotFoundError:
        raise ConfigError(str(path), ["missing (it holds the CHAP secrets the "
                                      "configuration names)"]) from None
    if why:
        raise ConfigError(str(path), [why])
    doc = _read_toml(path, problems, "CHAP secrets")
    credentials = {}
    for name, entry in (doc or {}).items():
        t = _Table(entry, name, problems)
        if not t.ok:
            continue
        if not _NAME.fullmatch(name):
            problems.add(name, "credential names use letters, digits, '.', '_' or '-'")
        values = {k: t.get(k, (str,), "", required=k in ("userid", "password"))
                  for k in ("userid", "password", "mutual_userid", "mutual_password")}
        for key, value in values.items():
            if value and not _CHAP_TEXT.fullmatch(value):
                problems.add(t.at(key), "printable ASCII without white space only")
            elif len(value) > MAX_CHAP:
                problems.add(t.at(key), f"longer than {MAX_CHAP} characters")
        for key in ("password", "mutual_password"):
            if values[key] and len(values[key]) < MIN_SECRET:
                problems.add(t.at(key), f"shorter than {MIN_SECRET} characters")
        if bool(values["mutual_userid"]) != bool(values["mutual_password"]):
            problems.add(t.at("mutual_password" if values["mutual_userid"] else "mutual_userid"),
                         "mutual CHAP needs both mutual_userid and mutual_password")
        if values["mutual_password"] and values["mutual_password"] == values["password"]:
            problems.add(t.at("mutual_password"), "must differ from password (RFC 7143: "
                                                  "one secret per direction)")
        t.finish()
        credentials[name] = Chap(name, **values)
    if problems.items:
        raise ConfigError(str(path), problems.items)
    return credentials


# -- load / dump ----------------------------------------------------------------------

def parse(doc: dict[str, Any], credentials: dict[str, Chap] | None = None,
          source: str = LIO_FILE) -> LioConfig:
    """Validate a parsed ``lio.toml``; ``credentials`` None: CHAP names left unresolved."""
    parser = _Parser(credentials)
    config = parser.config(doc)
    parser.consistency(config)
    if parser.problems.items:
        raise ConfigError(source, parser.problems.items)
    return config


def load(path: str | os.PathLike[str] | None = None,
         secrets_path: str | os.PathLike[str] | None = None) -> LioConfig:
    """Read and validate ``lio.toml`` (default: in the config dir) and, when it names
    credentials, ``chap.toml`` (default: beside it)."""
    path = Path(path) if path is not None else config_dir() / LIO_FILE
    problems = _Problems()
    doc = _read_toml(path, problems, "the LIO configuration")
    if doc is None:
        raise ConfigError(str(path), problems.items)
    unresolved = _Parser(None)
    unresolved.consistency(unresolved.config(doc))
    if not unresolved.references:
        return parse(doc, None, str(path))
    secrets = Path(secrets_path) if secrets_path is not None else path.with_name(CHAP_FILE)
    try:
        credentials = load_secrets(secrets)
    except ConfigError as exc:
        if not unresolved.problems.items:
            raise
        raise ConfigError(str(path), unresolved.problems.items
                          + [f"{exc.source}: {p}" for p in exc.problems]) from None
    return parse(doc, credentials, str(path))


def to_doc(config: LioConfig) -> dict[str, Any]:
    """``lio.toml`` as a TOML document (defaults left out, credentials by name)."""
    doc: dict[str, Any] = {}
    if config.discovery is not None:
        d: dict[str, Any] = {"enable": config.discovery.enable}
        if config.discovery.chap:
            d["chap"] = config.discovery.chap.name
        doc["discovery"] = d
    targets = []
    for target in config.targets:
        tpgs = []
        for tpg in target.tpgs:
            g: dict[str, Any] = {"tag": tpg.tag, "portals": [str(p) for p in tpg.portals]}
            if tpg.authentication is not None:
                g["authentication"] = tpg.authentication
            for name, default in (("generate_node_acls", False),
                                  ("demo_mode_write_protect", True), ("enable", True)):
                if getattr(tpg, name) != default:
                    g[name] = getattr(tpg, name)
            if tpg.chap:
                g["chap"] = tpg.chap.name
            if tpg.attributes:
                g["attributes"] = dict(tpg.attributes)
            g["luns"] = [_lun_doc(x) for x in tpg.luns]
            g["acls"] = [_acl_doc(a) for a in tpg.acls]
            tpgs.append(g)
        targets.append({"iqn": target.iqn, "tpgs": tpgs})
    doc["targets"] = targets
    return doc


#: the Lun fields that describe its backstore: LUNs sharing one must agree on them
_BACKSTORE_SETTINGS = ("block_size", "kms", "plain", "serial", "write_cache")


def _backstore_settings(lun: Lun) -> tuple[Any, ...]:
    return tuple(getattr(lun, name) for name in _BACKSTORE_SETTINGS)


def _lun_doc(lun: Lun) -> dict[str, Any]:
    d: dict[str, Any] = {"lun": lun.lun, "path": lun.path, "block_size": lun.block_size}
    for name in ("kms", "backstore", "serial"):
        if getattr(lun, name) is not None:
            d[name] = getattr(lun, name)
    for name in ("plain", "write_cache"):
        if getattr(lun, name):
            d[name] = True
    return d


def _acl_doc(acl: Acl) -> dict[str, Any]:
    d: dict[str, Any] = {"initiator": acl.initiator}
    if acl.chap:
        d["chap"] = acl.chap.name
    if acl.attributes:
        d["attributes"] = dict(acl.attributes)
    mapped = []
    for m in acl.mapped_luns:
        entry: dict[str, Any] = {"lun": m.lun}
        if m.mapped_lun is not None:
            entry["mapped_lun"] = m.mapped_lun
        if m.write_protect:
            entry["write_protect"] = True
        mapped.append(entry)
    d["mapped_luns"] = mapped
    return d


def dump(config: LioConfig) -> str:
    """``lio.toml`` text (no secrets)."""
    return tomli_w.dumps(to_doc(config))


def dump_secrets(config: LioConfig) -> str:
    """``chap.toml`` text: the credentials the configuration names."""
    doc = {}
    for name, chap in sorted(config.credentials().items()):
        entry = {"userid": chap.userid, "password": chap.password}
        if chap.mutual:
            entry |= {"mutual_userid": chap.mutual_userid,
                      "mutual_password": chap.mutual_password}
        doc[name] = entry
    return tomli_w.dumps(doc)


def _write(path: Path, text: str, mode: int) -> None:
    """Atomically, created with ``mode`` (never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save(config: LioConfig, path: str | os.PathLike[str],
         secrets_path: str | os.PathLike[str] | None = None) -> None:
    """Write ``lio.toml`` (0644) and, when credentials are named, ``chap.toml`` (0600)."""
    path = Path(path)
    if config.credentials():
        _write(Path(secrets_path) if secrets_path else path.with_name(CHAP_FILE),
               dump_secrets(config), 0o600)
    _write(path, dump(config), 0o644)
