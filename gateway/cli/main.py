"""``evlu``: create, inspect, check, migrate and re-key eVLUs from the shell.

Commands that need a KEK get it from the KMS through the key id in the
volume's header, as the gateway does (profiles and the gateway identity in
$EVLU_CONFIG_DIR, default /etc/evlu-gateway; identity from $EVLU_GATEWAY);
--kek-file uses a KEK from a file instead (offline use, no KMS).

The commands are declared in :mod:`.parser` and run from the ``*_cmds``
modules, imported only for the command that runs.  Exit codes: :mod:`.errors`
(also in ``evlu --help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import (EXIT_ERROR, EXIT_KMS_REFUSED, EXIT_KMS_UNREACHABLE, EXIT_NO_HEADER,
                     EXIT_REFUSED, EXIT_UNUSABLE, EXIT_USAGE, EXIT_WRONG_KEY, CliError)
from .parser import build_parser

__all__ = ["CliError", "build_parser", "execute", "main"]


#: (module, exception type, exit code), most specific first; by name, so that only the
#: modules a command loaded are consulted (only they can have raised)
_EXIT_CODES = (
    ("gateway.volume", "OperationRefusedError", EXIT_REFUSED),
    ("gateway.format", "WrongKeyError", EXIT_WRONG_KEY),
    ("gateway.kms", "KmsConfigError", EXIT_USAGE),
    ("gateway.kms", "KmsUnreachableError", EXIT_KMS_UNREACHABLE),
    ("gateway.kms", "KmsError", EXIT_KMS_REFUSED),
    ("gateway.format", "HeaderExistsError", EXIT_REFUSED),
    ("gateway.format", "NoHeaderError", EXIT_NO_HEADER),
    ("gateway.format", "LayoutError", EXIT_USAGE),
    ("gateway.format", "FormatError", EXIT_UNUSABLE),
    ("gateway.backstore", "BackstoreError", EXIT_ERROR),
    ("gateway.volume", "VolumeError", EXIT_ERROR),
    ("gateway.tcmu.netlink", "NetlinkError", EXIT_ERROR),
    ("gateway.tcmu.dbus_service", "DbusError", EXIT_ERROR),
)


def _exit_code(exc: Exception) -> int | None:
    """The exit code for an error of the layers below, or None (a bug: let it through)."""
    keys = sys.modules.get("gateway.cli.keys")
    if keys is not None and isinstance(exc, keys.KmsRefusal):
        return EXIT_WRONG_KEY if exc.wrong_key else EXIT_KMS_REFUSED
    for module, name, code in _EXIT_CODES:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return code
    return None


def execute(args: argparse.Namespace) -> int:
    """Run a parsed command; every failure is a CliError with its exit code and message.

    For callers in this process (targetcli-evlu) as much as for :func:`main`."""
    module, _, name = args.func.partition(":")
    func = getattr(importlib.import_module(f".{module}", __package__), name)
    try:
        return func(args)
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        raise CliError(str(exc), code) from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return execute(args)
    except CliError as exc:
        print(f"evlu: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("evlu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
