"""``evlu tcmu ...``: run the ``user:evlu`` TCMU handler, check a configuration."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from ..process import make_undumpable
from ..tcmu import cfgstring
from ..tcmu.dbus_service import TcmuDbusService
from ..tcmu.handler import Handler
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
        handler = Handler(session.lookups, workers=args.workers, pin=args.pin_devices,
                          beside_runner=args.dbus == "beside-runner").start()
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
