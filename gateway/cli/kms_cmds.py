"""``evlu kms ...``: the embedded key server, enrollment, profiles, key cache, status."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..kms import Address, Config, KmsConfigError, Profile
from ..kms import server as kms_server
from ..kms.audit import AuditLog
from ..kms.cache import DEFAULT_TTL
from ..kms.pool import ManagerPool


def cmd_init(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)
    files = kms_server.init(config, host=args.address, port=args.port, names=args.name)
    print(f"embedded key server initialised in {files.root}\n"
          f"  listens on:   {args.address}:{args.port}\n"
          f"  CA:           {files.ca[0]}\n  database:     {files.database}\n"
          f"next: 'evlu kms enroll NAME' for each gateway, then 'evlu kms serve'")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)

    def ready(host: str, port: int) -> None:
        print(f"evlu kms: serving KMIP on {host}:{port} (log: {config.kms_dir / 'server.log'})",
              flush=True)
    kms_server.serve(config, on_ready=ready, log_level=args.log_level)
    print("evlu kms: stopped", flush=True)
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)
    identity = kms_server.enroll(config, args.name, make_default=True if args.default else None)
    AuditLog(config.audit_path, args.name).record("enroll", gateway_cert=str(identity.cert))
    print(f"gateway {args.name} enrolled\n  certificate: {identity.cert}\n"
          f"  key:         {identity.key} (0600)\n"
          f"  profile:     {kms_server.EMBEDDED_PROFILE} "
          f"({config.root / 'profiles' / (kms_server.EMBEDDED_PROFILE + '.json')})\n"
          f"act as it with EVLU_GATEWAY={args.name} or --gateway {args.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)
    pool = ManagerPool(config, args.gateway)
    names = [args.kms] if args.kms else config.profile_names()
    if not names:
        raise KmsConfigError(f"no KMS profile in {config.root}")
    worst = 0
    try:
        for name in names:
            health = pool.get(name).health()
            state = "ok" if health.ok else "FAILED"
            print(f"{name}: {state} via {health.address} as {pool.identity_name} "
                  f"({health.latency_ms:.1f} ms){'' if health.ok else ': ' + health.detail}")
            worst = worst if health.ok else 8
    finally:
        pool.close()
    return worst


def cmd_profile_add(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)
    if bool(args.cert) != bool(args.key):
        raise KmsConfigError("give both --cert and --key, or neither (then the enrolled "
                             "gateway identity is used)")

    def path(value: str | None) -> Path | None:
        return Path(value).resolve() if value else None
    ca = path(args.ca)
    assert ca is not None
    if not ca.exists():
        raise KmsConfigError(f"CA file {ca} does not exist")
    profile = Profile(args.name, tuple(Address.parse(a) for a in args.address), ca,
                      path(args.cert), path(args.key), args.timeout)
    config.save_profile(profile, make_default=args.default)
    print(f"KMS profile {args.name} saved: {', '.join(map(str, profile.addresses))}")
    return 0


def cmd_profile_list(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)
    default = config.settings().default_profile
    for name in config.profile_names():
        profile = config.profile(name)
        mark = "*" if name == default else " "
        who = f"cert {profile.cert}" if profile.cert else "gateway identity"
        print(f"{mark} {name}: {', '.join(map(str, profile.addresses))} (CA {profile.ca}, {who})")
    return 0


def cmd_profile_remove(args: argparse.Namespace) -> int:
    Config(args.config_dir).remove_profile(args.name)
    print(f"KMS profile {args.name} removed")
    return 0


def cmd_profile_default(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)
    config.profile(args.name)  # must exist
    settings = config.settings()
    settings.default_profile = args.name
    config.save_settings(settings)
    print(f"default KMS profile: {args.name}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    config = Config(args.config_dir)
    settings = config.settings()
    cache: dict[str, Any] = dict(settings.key_cache)
    if args.action == "on":
        cache.update(enabled=True, ttl=args.ttl)
        if args.host_key_file:
            key_file = Path(args.host_key_file).resolve()
            if not key_file.exists():
                raise KmsConfigError(f"host key file {key_file} does not exist")
            cache["host_key_file"] = str(key_file)
    elif args.action == "off":
        cache["enabled"] = False
        keys = config.cache_dir / "keys.json"
        if keys.exists():
            os.unlink(keys)
    if args.action != "status":
        settings.key_cache = cache
        config.save_settings(settings)
    state = "on" if cache.get("enabled") else "off"
    print(f"key cache: {state}" + (f", TTL {cache.get('ttl', DEFAULT_TTL):g} s, host key "
                                   f"{cache.get('host_key_file') or config.cache_dir / 'host.key'}"
                                   if state == "on" else ""))
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``evlu kms`` and its subcommands."""
    kms = sub.add_parser("kms", help="Key manager: embedded server, enrollment, profiles, cache.",
                         description="Key manager: embedded KMIP server, gateway enrollment, "
                                     "KMS profiles, the local key cache, health.")
    ksub = kms.add_subparsers(dest="kms_command", metavar="SUBCOMMAND", required=True)

    def add(parent: Any, name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=text, description=text, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add(ksub, "init", cmd_init, "Create the embedded key server: CA, server certificate, "
                                    "PyKMIP configuration and the perimeter policy.")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on and put in the certificate (default: %(default)s)")
    p.add_argument("--port", type=int, default=5696, help="KMIP port (default: %(default)s)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP the server is reached by (repeatable)")

    p = add(ksub, "serve", cmd_serve, "Run the embedded key server in the foreground "
                                      "(SIGTERM/SIGINT stop it cleanly).")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="PyKMIP log level (default: %(default)s)")

    p = add(ksub, "enroll", cmd_enroll, "Issue a gateway identity (certificate + 0600 key) "
                                        "and write the embedded client profile.")
    p.add_argument("name", metavar="NAME", help="gateway name (the certificate's CN)")
    p.add_argument("--default", action="store_true",
                   help="make it this host's default identity (the first enrolled one is)")

    p = add(ksub, "status", cmd_status, "Check that each KMS profile answers this gateway "
                                        "(exit 8 if one does not).")
    p.add_argument("--kms", metavar="PROFILE", help="only this profile")

    prof = ksub.add_parser("profile", help="Manage KMS profiles.",
                           description="Manage KMS profiles (any KMIP 1.x/2.x server).")
    psub = prof.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    p = add(psub, "add", cmd_profile_add, "Add or replace a KMS profile.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--address", action="append", required=True, metavar="HOST[:PORT]",
                   help="KMS address; repeat for failover, in order")
    p.add_argument("--ca", required=True, metavar="FILE", help="CA certificate(s) of the KMS")
    p.add_argument("--cert", metavar="FILE", help="client certificate (default: the gateway's)")
    p.add_argument("--key", metavar="FILE", help="client key (default: the gateway's)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default: %(default)s)")
    p.add_argument("--default", action="store_true", help="make it the default profile")
    add(psub, "list", cmd_profile_list, "List KMS profiles (* = default).")
    p = add(psub, "remove", cmd_profile_remove, "Remove a KMS profile.")
    p.add_argument("name", metavar="NAME")
    p = add(psub, "default", cmd_profile_default, "Set the default KMS profile.")
    p.add_argument("name", metavar="NAME")

    p = add(ksub, "cache", cmd_cache, "Turn the local key cache on or off (off by default): "
                                      "KEKs kept wrapped under a host key, for KMS outages.")
    p.add_argument("action", choices=("on", "off", "status"))
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL,
                   help="seconds a cached KEK stays usable (default: %(default)g)")
    p.add_argument("--host-key-file", metavar="FILE",
                   help="32-byte host key to wrap cached KEKs with (default: one made on first "
                        "use, 0600)")


