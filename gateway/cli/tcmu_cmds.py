"""``evlu tcmu ...``: run the ``user:evlu`` TCMU handler, check a configuration."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from ..process import make_undumpable
from ..tcmu import cfgstring
from ..tcmu.dbus_service import TcmuDbusService
from ..tcmu.handler import Handler
from ..tcmu.netlink import set_reply_mode
from .keys import KmsSession


def cmd_serve(args: argparse.Namespace) -> int:
    make_undumpable()
    # a daemon under journald: devices attached, detached, reconfigured (never a key)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    session = KmsSession.from_args(args, require_identity=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    handler = dbus = None
    try:
        if args.dbus == "standalone":
            # No tcmu-runner here: switch off the reply mode it may have left on, so
            # devices made by stock targetcli or restoreconfig (no nl_reply_supported=-1)
            # are not waited for.
            set_reply_mode(False)
        handler = Handler(session.lookups, workers=args.workers).start()
        if args.dbus != "off":
            dbus = TcmuDbusService(cfgstring.SUBTYPE, cfgstring.CONFIG_DESC, cfgstring.check,
                                   beside_runner=args.dbus == "beside-runner").start()
        print(f"evlu tcmu: serving user:{cfgstring.SUBTYPE} devices "
              f"({len(handler.served)} now; D-Bus {args.dbus})", flush=True)
        stop.wait()
    finally:
        if dbus is not None:
            dbus.stop()
        if handler is not None:
            handler.stop()
        session.close()
    print("evlu tcmu: stopped", flush=True)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    ok, message = cfgstring.check(args.config)
    print(message)
    return 0 if ok else 2


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``evlu tcmu`` and its subcommands."""
    tcmu = sub.add_parser("tcmu", help="The user:evlu TCMU handler (LIO backstores).",
                          description="The user:evlu TCMU handler that serves LIO backstores "
                                      "from eVLUs.")
    tsub = tcmu.add_subparsers(dest="tcmu_command", metavar="SUBCOMMAND", required=True)
    p = tsub.add_parser("serve", parents=[common], help="Serve every user:evlu device "
                        "(foreground; SIGTERM stops it).",
                        description="Serve every user:evlu device of this host: existing ones "
                                    "and those created later (netlink), with keys from the KMS.")
    p.add_argument("--workers", type=int, default=4, help="I/O threads per device "
                                                          "(default: %(default)s)")
    p.add_argument("--dbus", choices=("standalone", "beside-runner", "off"), default="standalone",
                   help="how targetcli finds the handler: own org.kernel.TCMUService1 "
                        "(standalone), register with tcmu-runner, or no D-Bus "
                        "(default: %(default)s)")
    p.set_defaults(func=cmd_serve)
    p = tsub.add_parser("check", parents=[common], help="Say whether a user:evlu "
                        "configuration string can be served (targetcli's CheckConfig).")
    p.add_argument("config", metavar="PATH[;plain]")
    p.set_defaults(func=cmd_check)
