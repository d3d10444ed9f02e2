"""The embedded key manager: a PyKMIP server with its PKI and the perimeter policy.

``init`` writes, under ``<config>/kms/``: the CA (``ca.pem``, ``ca.key``), the
server certificate for the configured names (``server.pem``, ``server.key``),
PyKMIP's ``server.conf`` (own database and log paths), and the operation
policy ``policies/evlu-perimeter.json``.  PyKMIP's default for symmetric keys
is owner-only; under the perimeter policy every certificate the CA issued
with clientAuth (every enrolled gateway) may Get, Locate, and manage eVLU
KEKs, while a certificate from any other CA fails the TLS handshake.

``serve`` runs PyKMIP's server in the calling (main) thread until SIGTERM or
SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import compat, pki
from .config import Address, Config, Identity, Profile, check_name
from .errors import KmsConfigError
from .manager import PERIMETER_POLICY

EMBEDDED_PROFILE = "embedded"
_PERIMETER_OPERATIONS = ("GET", "GET_ATTRIBUTES", "GET_ATTRIBUTE_LIST", "LOCATE", "CHECK",
                         "ACTIVATE", "REVOKE", "DESTROY", "ADD_ATTRIBUTE", "MODIFY_ATTRIBUTE",
                         "DELETE_ATTRIBUTE", "SET_ATTRIBUTE")


@dataclass(frozen=True)
class ServerFiles:
    """Where the embedded server keeps its state."""

    root: Path

    @property
    def ca(self) -> tuple[Path, Path]:
        return self.root / "ca.pem", self.root / "ca.key"

    @property
    def server(self) -> tuple[Path, Path]:
        return self.root / "server.pem", self.root / "server.key"

    @property
    def conf(self) -> Path:
        return self.root / "server.conf"

    @property
    def policies(self) -> Path:
        return self.root / "policies"

    @property
    def database(self) -> Path:
        return self.root / "pykmip.db"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def listen(self) -> Path:
        return self.root / "listen.json"

    @property
    def enrolled(self) -> Path:
        return self.root / "enrolled.json"


def init(config: Config, *, host: str = "127.0.0.1", port: int = 5696,
         names: list[str] | None = None) -> ServerFiles:
    """Create the embedded server's PKI, configuration and policy (once)."""
    files = ServerFiles(config.kms_dir)
    if files.ca[0].exists():
        raise KmsConfigError(f"a key server is already initialised in {files.root}; "
                             "remove that directory to start over (its keys are lost)")
    files.root.mkdir(parents=True, exist_ok=True)
    os.chmod(files.root, 0o700)
    files.policies.mkdir(exist_ok=True)
    san = list(dict.fromkeys([host, *(names or []), "localhost", "127.0.0.1",
                              socket.gethostname()]))
    ca = pki.make_ca(f"evlu-gateway KMS CA ({socket.gethostname()})")
    pki.write_pair(ca, *files.ca)
    pki.write_pair(pki.issue(ca, "evlu-kms", server_names=san), *files.server)
    policy = {PERIMETER_POLICY: {"preset": {"SYMMETRIC_KEY": {op: "ALLOW_ALL"
                                                         for op in _PERIMETER_OPERATIONS}}}}
    (files.policies / f"{PERIMETER_POLICY}.json").write_text(json.dumps(policy, indent=2) + "\n")
    files.conf.write_text(
        "[server]\n"
        f"hostname={host}\nport={port}\n"
        f"certificate_path={files.server[0]}\nkey_path={files.server[1]}\n"
        f"ca_path={files.ca[0]}\nauth_suite=TLS1.2\n"
        f"policy_path={files.policies}\nenable_tls_client_auth=True\n"
        f"database_path={files.database}\nlogging_level=INFO\n")
    files.listen.write_text(json.dumps({"host": host, "port": port, "names": san}) + "\n")
    return files


def _load_ca(files: ServerFiles) -> pki.Pair:
    if not files.ca[0].exists():
        raise KmsConfigError(f"no embedded key server in {files.root}: run 'evlu kms init' first")
    return pki.load_pair(*files.ca)


def enroll(config: Config, name: str, *, make_default: bool | None = None) -> Identity:
    """Issue gateway ``name`` a client certificate and make sure the embedded profile exists."""
    check_name("gateway", name)
    files = ServerFiles(config.kms_dir)
    ca = _load_ca(files)
    directory = config.identity_dir(name)
    if (directory / "cert.pem").exists():
        raise KmsConfigError(f"gateway {name!r} is already enrolled ({directory})")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    identity = Identity(name, directory / "cert.pem", directory / "key.pem")
    pki.write_pair(pki.issue(ca, name), identity.cert, identity.key)
    listen = json.loads(files.listen.read_text())
    if EMBEDDED_PROFILE not in config.profile_names():
        # The profile carries its own copy of the CA, so profiles/ and gateways/NAME/
        # are all a gateway on another host needs.
        ca_copy = config.root / "profiles" / f"{EMBEDDED_PROFILE}-ca.pem"
        ca_copy.parent.mkdir(parents=True, exist_ok=True)
        ca_copy.write_bytes(files.ca[0].read_bytes())
        config.save_profile(Profile(EMBEDDED_PROFILE,
                                    (Address(listen["host"], int(listen["port"])),), ca_copy))
    settings = config.settings()
    if make_default or (make_default is None and settings.gateway is None):
        settings.gateway = name
        config.save_settings(settings)
    enrolled = json.loads(files.enrolled.read_text()) if files.enrolled.exists() else []
    enrolled.append({"name": name, "serial": format(pki.load_pair(identity.cert,
                                                                  identity.key).cert.serial_number, "x")})
    files.enrolled.write_text(json.dumps(enrolled, indent=2) + "\n")
    return identity


def serve(config: Config, *, on_ready: Callable[[str, int], None] | None = None,
          log_level: str = "INFO") -> None:
    """Run the embedded PyKMIP server in this (main) thread until SIGTERM/SIGINT."""
    files = ServerFiles(config.kms_dir)
    _load_ca(files)
    server_mod = compat.load("kmip.services.server.server")
    listen = json.loads(files.listen.read_text())
    server = server_mod.KmipServer(config_path=str(files.conf), log_path=str(files.log),
                                   logging_level=log_level)
    logging.getLogger("kmip").propagate = False  # PyKMIP logs to its own file
    server.start()
    # PyKMIP's accept loop wakes every 10 s to look at its serving flag, which its
    # SIGTERM/SIGINT handlers clear; a shorter timeout makes shutdown prompt.
    server._socket.settimeout(0.5)  # noqa: SLF001 - no public setting for it
    if on_ready is not None:
        on_ready(listen["host"], int(listen["port"]))
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
