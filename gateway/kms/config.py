"""The gateway's configuration directory: KMS profiles, gateway identities, settings.

Layout (default ``/etc/evlu-gateway``; ``EVLU_CONFIG_DIR`` or ``--config-dir``
overrides it)::

    gateway.json            settings: default profile, default identity, key cache
    profiles/NAME.json      a KMS: addresses (failover order), CA, optional cert/key
    gateways/NAME/          an enrolled identity: cert.pem, key.pem (0600)
    kms/                    the embedded key server (see :mod:`gateway.kms.server`)
    audit.log               one JSON line per key event
    cache/                  the optional local key cache

Relative paths inside profiles are relative to the directory, so a whole
configuration can be moved or copied.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import KmsConfigError

DEFAULT_CONFIG_DIR = "/etc/evlu-gateway"
DEFAULT_PORT = 5696
DEFAULT_TIMEOUT = 5.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(kind: str, name: str) -> str:
    """A profile or gateway name: letters, digits, '.', '_', '-' (not a path)."""
    if not _NAME.match(name):
        raise KmsConfigError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' "
                             "or '-', at most 63 characters")
    return name


@dataclass(frozen=True)
class Address:
    """One KMS endpoint."""

    host: str
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> Address:
        """``host``, ``host:port`` or ``[v6]:port``."""
        match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text.strip())
        if not match:
            raise KmsConfigError(f"invalid KMS address {text!r}: use HOST or HOST:PORT")
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4) or DEFAULT_PORT)
        if not 0 < port < 65536:
            raise KmsConfigError(f"invalid port in KMS address {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Profile:
    """A KMS as this gateway reaches it."""

    name: str
    addresses: tuple[Address, ...]
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    def to_json(self, root: Path) -> dict[str, Any]:
        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            try:
                return str(p.relative_to(root))
            except ValueError:
                return str(p)
        doc = {"addresses": [str(a) for a in self.addresses], "ca": rel(self.ca),
               "cert": rel(self.cert), "key": rel(self.key), "timeout": self.timeout}
        return {k: v for k, v in doc.items() if v is not None}

    @classmethod
    def from_json(cls, name: str, doc: Any, root: Path) -> Profile:
        where = f"KMS profile {name!r}"
        if not isinstance(doc, dict):
            raise KmsConfigError(f"{where}: not a JSON object")
        addresses = doc.get("addresses")
        if not isinstance(addresses, list) or not addresses or \
                not all(isinstance(a, str) for a in addresses):
            raise KmsConfigError(f"{where}: 'addresses' must be a non-empty list of HOST:PORT")

        def path(key: str, required: bool) -> Path | None:
            value = doc.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise KmsConfigError(f"{where}: '{key}' must be a file path")
            return root / value
        timeout = doc.get("timeout", DEFAULT_TIMEOUT)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
            raise KmsConfigError(f"{where}: 'timeout' must be a number of seconds in (0, 300]")
        cert, key = path("cert", False), path("key", False)
        if (cert is None) != (key is None):
            raise KmsConfigError(f"{where}: give both 'cert' and 'key', or neither")
        return cls(name, tuple(Address.parse(a) for a in addresses), path("ca", True),  # type: ignore[arg-type]
                   cert, key, float(timeout))


@dataclass(frozen=True)
class Identity:
    """The certificate a gateway presents to the KMS."""

    name: str
    cert: Path
    key: Path


@dataclass
class Settings:
    """``gateway.json``."""

    default_profile: str | None = None
    gateway: str | None = None
    key_cache: dict[str, Any] = field(default_factory=dict)


class Config:
    """One configuration directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root or os.environ.get("EVLU_CONFIG_DIR") or DEFAULT_CONFIG_DIR)

    @property
    def kms_dir(self) -> Path:
        return self.root / "kms"

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.log"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    # -- settings -------------------------------------------------------------

    def settings(self) -> Settings:
        path = self.root / "gateway.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return Settings()
        except (OSError, ValueError) as exc:
            raise KmsConfigError(f"{path}: {exc}") from None
        if not isinstance(doc, dict):
            raise KmsConfigError(f"{path}: not a JSON object")
        cache = doc.get("key_cache") or {}
        if not isinstance(cache, dict):
            raise KmsConfigError(f"{path}: 'key_cache' must be an object")
        return Settings(doc.get("default_profile"), doc.get("gateway"), cache)

    def save_settings(self, settings: Settings) -> None:
        doc = {"default_profile": settings.default_profile, "gateway": settings.gateway,
               "key_cache": settings.key_cache}
        _write_json(self.root / "gateway.json", doc)

    # -- profiles ---------------------------------------------------------------

    def profile_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "profiles").glob("*.json"))

    def profile(self, name: str | None = None) -> Profile:
        """A named profile, or the default one."""
        if name is None:
            name = self.settings().default_profile
            if name is None:
                names = self.profile_names()
                if len(names) != 1:
                    raise KmsConfigError(
                        f"no default KMS profile in {self.root}: run 'evlu kms init' and "
                        "'evlu kms enroll NAME', or 'evlu kms profile add NAME ...'"
                        if not names else
                        f"several KMS profiles ({', '.join(names)}) and no default: "
                        "run 'evlu kms profile default NAME' or pass --kms NAME")
                name = names[0]
        path = self.root / "profiles" / f"{check_name('profile', name)}.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise KmsConfigError(f"no KMS profile {name!r} in {self.root} "
                                 f"(known: {', '.join(self.profile_names()) or 'none'})") from None
        except (OSError, ValueError) as exc:
            raise KmsConfigError(f"{path}: {exc}") from None
        return Profile.from_json(name, doc, self.root)

    def save_profile(self, profile: Profile, *, make_default: bool = False) -> None:
        _write_json(self.root / "profiles" / f"{check_name('profile', profile.name)}.json",
                    profile.to_json(self.root))
        settings = self.settings()
        if make_default or settings.default_profile is None:
            settings.default_profile = profile.name
            self.save_settings(settings)

    def remove_profile(self, name: str) -> None:
        path = self.root / "profiles" / f"{check_name('profile', name)}.json"
        try:
            path.unlink()
        except FileNotFoundError:
            raise KmsConfigError(f"no KMS profile {name!r}") from None
        settings = self.settings()
        if settings.default_profile == name:
            settings.default_profile = None
            self.save_settings(settings)

    # -- identities ---------------------------------------------------------------

    def identity_dir(self, name: str) -> Path:
        return self.root / "gateways" / check_name("gateway", name)

    def identity_names(self) -> list[str]:
        base = self.root / "gateways"
        return sorted(p.name for p in base.iterdir() if (p / "cert.pem").exists()) \
            if base.is_dir() else []

    def identity(self, name: str | None = None) -> Identity:
        """``name``, else ``EVLU_GATEWAY``, else the configured default, else this host's name."""
        name = name or os.environ.get("EVLU_GATEWAY") or self.settings().gateway \
            or socket.gethostname().split(".")[0]
        directory = self.identity_dir(name)
        cert, key = directory / "cert.pem", directory / "key.pem"
        if not cert.exists() or not key.exists():
            known = ", ".join(self.identity_names()) or "none"
            raise KmsConfigError(f"gateway {name!r} is not enrolled in {self.root} (enrolled: "
                                 f"{known}); run 'evlu kms enroll {name}' on the key server's "
                                 "host, or set EVLU_GATEWAY / --gateway")
        return Identity(name, cert, key)

    def credentials(self, profile: Profile, gateway: str | None = None) -> Identity:
        """The certificate and key used with ``profile``: its own, else the gateway's."""
        if profile.cert is not None and profile.key is not None:
            return Identity(f"profile:{profile.name}", profile.cert, profile.key)
        return self.identity(gateway)


def _write_json(path: Path, doc: Any) -> None:
    """Write atomically (temp file + rename), 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
