"""``python -m gateway.daemon``: run gatewayd in the foreground (SIGTERM/SIGINT stop it).

Options come from the command line and, with ``--config FILE``, from a TOML
file whose keys are the long option names (``socket = "/run/..."``,
``watch-interval = 5``, ``metrics = "off"``); the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import tomllib
from pathlib import Path

from .. import __version__
from ..process import make_undumpable
from . import logs
from .daemon import Gatewayd, Options
from .lioconfig import LioFile
from .server import DEFAULT_SOCKET, SocketInUseError

_log = logging.getLogger("gateway.daemon")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _address(text: str) -> tuple[str, int] | None:
    if text in ("off", "none", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT, or off")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway.daemon", argument_default=argparse.SUPPRESS,
        description="gatewayd: serves user:evlu LUNs (TCMU handler), looks their keys up "
                    "(KMIP), keeps LIO as configured; control API on a root-only Unix "
                    "socket, Prometheus metrics, systemd readiness (Type=notify).",
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    p.add_argument("--config", metavar="FILE", type=Path,
                   help="TOML file of options (keys: the long option names)")
    p.add_argument("--config-dir", metavar="DIR", type=Path,
                   help="evlu configuration directory: KMS profiles, identity, audit log, "
                        "key cache (default: $EVLU_CONFIG_DIR or /etc/evlu-gateway)")
    p.add_argument("--gateway", metavar="NAME", help="enrolled gateway identity (default: "
                   "$EVLU_GATEWAY, else the configured default, else the host name)")
    p.add_argument("--socket", metavar="PATH", type=Path,
                   help=f"control socket (default: {DEFAULT_SOCKET}; 0600 in a 0700 directory)")
    p.add_argument("--metrics", metavar="HOST:PORT", type=_address,
                   help="Prometheus endpoint, or off (default: 127.0.0.1:9561)")
    p.add_argument("--log-format", choices=("json", "text"),
                   help="log lines on stderr: JSON objects or text (default: json)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="default: info")
    p.add_argument("--workers", type=int, metavar="N", help="I/O threads per device "
                   "(default: 4)")
    p.add_argument("--pin-devices", action="store_const", const=True,
                   help="run all of a device's threads on one CPU, devices spread over "
                        "the CPUs (cheaper small I/O, slower large encrypted I/O; "
                        "default: off)")
    p.add_argument("--dbus", choices=("standalone", "beside-runner", "off"),
                   help="how targetcli finds the handler (default: standalone); "
                        "beside-runner whenever tcmu-runner runs")
    p.add_argument("--no-netlink", dest="netlink", action="store_const", const=False,
                   help="do not follow TCM-USER netlink events (only the devices present at "
                        "start are served; for hosts without target_core_user, and tests)")
    p.add_argument("--no-lio", dest="lio", action="store_const", const=False,
                   help="do not manage LIO from lio.toml (hosts without configfs, tests): "
                        "lun add then serves a store without exporting it")
    p.add_argument("--sysfs", metavar="DIR", type=Path,
                   help="where uio devices are listed (default: /sys/class/uio)")
    p.add_argument("--configfs", metavar="DIR", type=Path,
                   help="LIO's core configfs directory (default: "
                        "/sys/kernel/config/target/core)")
    p.add_argument("--watch-interval", type=float, metavar="SECONDS",
                   help="how often each LUN's header seqid/checksum is checked (default: 10)")
    p.add_argument("--kms-probe-interval", type=float, metavar="SECONDS",
                   help="how often each KMS profile is probed (default: 30)")
    p.add_argument("--stop-timeout", type=float, metavar="SECONDS",
                   help="at shutdown, how long in-flight commands may take before they are "
                        "failed with BUSY (default: 10)")
    return p


_KEYS = ("config_dir", "gateway", "socket", "metrics", "log_format", "log_level", "workers",
         "pin_devices", "dbus", "netlink", "lio", "sysfs", "configfs", "watch_interval",
         "kms_probe_interval", "stop_timeout")
_PATHS = ("config_dir", "socket", "sysfs", "configfs")


def resolve(args: argparse.Namespace) -> tuple[Options, str, str]:
    """Options from the command line over the config file over the defaults."""
    settings: dict[str, object] = {}
    if "config" in args:
        try:
            with open(args.config, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"gatewayd: cannot read {args.config}: {exc}") from None
        for key, value in doc.items():
            name = key.replace("-", "_")
            if name not in _KEYS:
                raise SystemExit(f"gatewayd: {args.config}: unknown option {key!r}")
            if name == "metrics":
                try:
                    value = _address(str(value))
                except argparse.ArgumentTypeError as exc:
                    raise SystemExit(f"gatewayd: {args.config}: metrics: {exc}") from None
            elif name in _PATHS:
                value = Path(str(value))
            settings[name] = value
    settings.update((name, value) for name, value in vars(args).items() if name in _KEYS)
    log_format = str(settings.pop("log_format", "json"))
    log_level = str(settings.pop("log_level", "info"))
    return Options(**settings), log_format, log_level  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options, log_format, log_level = resolve(args)
    logs.setup(log_format, log_level)
    if not make_undumpable():
        _log.warning("could not make the process undumpable (keys could leak in a core dump)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gatewayd = Gatewayd(options, reconciler=LioFile(options.config_dir) if options.lio else None)
    try:
        gatewayd.start()
    except Exception as exc:  # noqa: BLE001 - said once, clearly; systemd restarts us
        _log.error("gatewayd cannot start: %s", exc, exc_info=not isinstance(
            exc, (SocketInUseError, OSError)))
        gatewayd.stop()
        return EXIT_FAILED
    stop.wait()
    gatewayd.stop()
    if threading.active_count() > 1 and any(not t.daemon for t in threading.enumerate()
                                            if t is not threading.main_thread()):
        # abandoned I/O workers (a backing store that hangs) must not keep us alive
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
