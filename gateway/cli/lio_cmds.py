"""``evlu lio ...``: check, plan and apply the declarative LIO configuration (lio.toml)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..lio import boot
from ..lio import config as cfg
from ..lio.reconcile import OWNED_FILE, ApplyError, Change, PlanError, Reconciler
from ..lio.state import Ownership

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2
_MARKS = {"create": "+", "delete": "-", "update": "~"}


def _paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    root = cfg.config_dir(args.config_dir)
    return Path(args.config) if args.config else root / cfg.LIO_FILE, \
        Path(args.secrets) if args.secrets else None


def _load(args: argparse.Namespace) -> cfg.LioConfig | None:
    path, secrets = _paths(args)
    try:
        return cfg.load(path, secrets)
    except cfg.ConfigError as exc:
        print(f"evlu: {exc}", file=sys.stderr)
        return None


def _reconciler(args: argparse.Namespace) -> Reconciler:
    try:
        from ..lio.rts import RtsLio
    except ImportError as exc:
        raise SystemExit(f"evlu: rtslib-fb is needed to reach LIO (Debian: python3-rtslib-fb): "
                         f"{exc}") from None
    return Reconciler(RtsLio(), owned_path=cfg.config_dir(args.config_dir) / OWNED_FILE)


def _show(changes: list[Change]) -> None:
    for change in changes:
        print(f"  {_MARKS[change.action]} {change}")


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    luns = sum(1 for _ in config.luns())
    acls = sum(len(tpg.acls) for t in config.targets for tpg in t.tpgs)
    print(f"{_paths(args)[0]}: valid: {len(config.targets)} target(s), {luns} LUN(s), "
          f"{acls} ACL(s), {len(config.credentials())} CHAP credential(s)")
    return EXIT_OK


def _plan_or_apply(args: argparse.Namespace, apply: bool,
                   config: cfg.LioConfig | None = None) -> int:
    config = config if config is not None else _load(args)
    if config is None:
        return EXIT_CONFIG
    reconciler = _reconciler(args)
    try:
        changes = reconciler.apply(config) if apply else reconciler.plan(config)
    except PlanError as exc:
        print(f"evlu: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ApplyError as exc:
        print(f"evlu: lio apply failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not changes:
        print("LIO matches the configuration: nothing to do")
        return EXIT_OK
    print(f"{'applied' if apply else 'would apply'} {len(changes)} change(s):")
    _show(changes)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    return _plan_or_apply(args, apply=False)


def cmd_apply(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="evlu: %(message)s")
    return _plan_or_apply(args, apply=True)


def cmd_boot(args: argparse.Namespace) -> int:
    """Everything else from rtslib's file (even when lio.toml is missing or invalid), then
    the gateway's objects from lio.toml."""
    logging.basicConfig(level=logging.WARNING, format="evlu: %(message)s")
    exists = _paths(args)[0].exists()
    config = _load(args) if exists else cfg.LioConfig()
    owned = _reconciler(args).owned.load()
    if config is not None:
        owned |= Ownership(frozenset(t.iqn for t in config.targets),
                           frozenset(lun.backstore_name for _, lun in config.luns()),
                           config.discovery is not None)
    for error in boot.restore_others(owned, Path(args.saveconfig)):
        print(f"evlu: rtslib restore: {error}", file=sys.stderr)
    if config is None:
        return EXIT_CONFIG
    return _plan_or_apply(args, apply=True, config=config) if exists else EXIT_OK
