"""``evlu daemon status``, ``evlu lun ...``, ``evlu rescan``: gatewayd through its control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..daemon.client import NotRunningError, call
from ..daemon.control import Code, ControlError
from .errors import EXIT_NOT_RUNNING

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
