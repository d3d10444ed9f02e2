"""``evlu kms ...``: the embedded key server, enrollment, profiles, key cache, status."""

from __future__ import annotations

import argparse
import os
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
