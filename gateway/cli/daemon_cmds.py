"""``evlu daemon status``, ``evlu lun ...``, ``evlu rescan``: gatewayd through its control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..daemon.client import NotRunningError, call, default_socket
from ..daemon.control import Code, ControlError

EXIT_NOT_RUNNING = 10
#: control error code -> exit code (as the other evlu commands use them)
_EXIT = {Code.INVALID_PARAMS: 2, Code.UNKNOWN_METHOD: 2, Code.INVALID_REQUEST: 2,
         Code.NO_HEADER: 3, Code.UNUSABLE: 6, Code.CONFLICT: 7}
_STATE_EXIT = {"WAITING_FOR_KEY": 8, "NO_KEY": 9, "UNKNOWN": 6}


def _call(args: argparse.Namespace, method: str, **params: Any) -> Any:
    try:
        return call(method, params, socket_path=args.socket)
    except NotRunningError as exc:
        print(f"evlu: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_NOT_RUNNING) from None
    except ControlError as exc:
        print(f"evlu: gatewayd: {exc.message}", file=sys.stderr)
        raise SystemExit(_EXIT.get(exc.code, 1)) from None
    except PermissionError as exc:
        print(f"evlu: {args.socket}: {exc.strerror}: gatewayd's control socket is root's",
              file=sys.stderr)
        raise SystemExit(1) from None


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


def _lun_line(lun: dict[str, Any]) -> str:
    keys = ", ".join(k["key_id"] for k in lun["key_ids"]) or "-"
    served = f"{len(lun['devices'])} device(s)" if lun["devices"] else "not exported"
    return (f"{lun['name']:<16} {lun['state']:<16} {lun['size'] / 2**20:>10.0f} MiB  "
            f"{served:<14} {lun['path']}  key {keys}")


def cmd_status(args: argparse.Namespace) -> int:
    s = _call(args, "status")
    health = s["health"]
    failing = [f"{name}: {c['detail']}" for name, c in health["checks"].items() if not c["ok"]]
    luns = ", ".join(f"{n} {state}" for state, n in sorted(s["luns"].items())) or "none"
    kms = ", ".join(f"{p} {'reachable' if ok else 'UNREACHABLE'}"
                    for p, ok in sorted(s["kms"].items())) or "no profile"
    text = "\n".join([
        f"gatewayd {s['version']} (pid {s['pid']}, up {s['uptime']:.0f} s) as {s['gateway']}",
        f"health: {'live' if health['live'] else 'NOT LIVE'}, "
        f"{'ready' if health['ready'] else 'NOT READY'}",
        *(f"  {line}" for line in failing),
        f"LUNs: {luns}; TCMU devices: {s['devices']}",
        f"KMS: {kms}", f"LIO: {s['lio']}"])
    _print(args, s, text)
    return 0 if health["ready"] else 1


def cmd_lun_list(args: argparse.Namespace) -> int:
    luns = _call(args, "luns")
    _print(args, luns, "\n".join(map(_lun_line, luns)) or "no LUNs")
    return 0


def cmd_lun_info(args: argparse.Namespace) -> int:
    lun = _call(args, "lun.info", lun=os.path.abspath(args.lun) if "/" in args.lun else args.lun)
    text = "\n".join(f"{k}: {v}" for k, v in lun.items() if k != "key_ids") + "\nkey ids: " + \
        (", ".join(f"{k['key_id']} (KMS {k['kms']})" for k in lun["key_ids"]) or "none")
    _print(args, lun, text)
    return 0


def cmd_lun_add(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"path": os.path.abspath(args.path), "wait": args.wait}
    for name in ("target", "name"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    if args.plain:
        params["plain"] = True
    lun = _call(args, "lun.add", **params)
    lio = "; ".join(lun["lio"]) if isinstance(lun["lio"], list) else lun["lio"]
    _print(args, lun, f"{_lun_line(lun)}\n{lun['reason']}\nLIO: {lio}")
    return _STATE_EXIT.get(lun["state"], 0)


def cmd_rescan(args: argparse.Namespace) -> int:
    params = {"lun": args.lun} if args.lun else {}
    if args.accept_plain:
        params["accept_plain"] = True
    done = _call(args, "rescan", **params)
    _print(args, done, "\n".join(f"{d['lun']}: {d['state']}"
                                 f"{' (' + d['transition'] + ')' if d['transition'] else ''}"
                                 for d in done) or "no LUNs")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``evlu daemon``, ``evlu lun`` and ``evlu rescan``."""
    client = argparse.ArgumentParser(add_help=False)
    group = client.add_argument_group("gatewayd options")
    group.add_argument("--socket", type=Path, default=default_socket(), metavar="PATH",
                       help="gatewayd's control socket (default: $EVLU_GATEWAYD_SOCKET or "
                            "%(default)s)")
    group.add_argument("--json", action="store_true", help="print gatewayd's JSON answer")

    daemon = sub.add_parser("daemon", help="gatewayd: status.", description="gatewayd, the "
                            "gateway daemon (systemctl start evlu-gatewayd).")
    dsub = daemon.add_subparsers(dest="daemon_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser("status", parents=[client], help="Health, LUNs, KMS, LIO (exit 1 "
                        "when not ready).")
    p.set_defaults(func=cmd_status)

    lun = sub.add_parser("lun", help="LUNs served by gatewayd.",
                         description="LUNs served by gatewayd.")
    lsub = lun.add_subparsers(dest="lun_command", metavar="SUBCOMMAND", required=True)
    p = lsub.add_parser("list", parents=[client], help="Every LUN, its state and size.")
    p.set_defaults(func=cmd_lun_list)
    p = lsub.add_parser("info", parents=[client], help="One LUN (by name or path).")
    p.add_argument("lun", metavar="NAME|PATH")
    p.set_defaults(func=cmd_lun_info)
    p = lsub.add_parser("add", parents=[client], help="Serve a backing store: its header is "
                        "read and its key looked up (any replica, snapshot or copy); exit 8/9 "
                        "when the key stays unavailable/refused.")
    p.add_argument("path", metavar="PATH", help="backing file or block device")
    p.add_argument("--target", metavar="IQN", help="target to export it under (default: the "
                   "LIO configuration's default)")
    p.add_argument("--name", help="LUN name (default: from the file name)")
    p.add_argument("--plain", action="store_true",
                   help="serve a store without an eVLU header unencrypted")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the key (default: %(default)s)")
    p.set_defaults(func=cmd_lun_add)

    p = sub.add_parser("rescan", parents=[client], help="Re-read LUN metadata (all, or one).",
                       description="Re-read the metadata of every LUN, or of one, through "
                                   "gatewayd; changes raise unit attentions.")
    p.add_argument("lun", metavar="NAME|PATH", nargs="?")
    p.add_argument("--accept-plain", action="store_true",
                   help="serve an encrypted LUN whose header vanished as plain")
    p.set_defaults(func=cmd_rescan)
