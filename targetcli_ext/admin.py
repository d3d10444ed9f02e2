"""The eVLU admin operations of ``evlu`` (format, rotate, bind, ...), run in this process.

The shell passes the same arguments an admin would type, so the KMS session,
the audit log and every safety check are those of the ``evlu`` command."""

from __future__ import annotations

from configshell_fb import ExecutionError

from gateway.cli.main import CliError, build_parser, execute


def evlu(*argv: str) -> None:
    """Run ``evlu ARGV...``; its failure is an ExecutionError with its message."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit:  # argparse already said what was wrong
        raise ExecutionError(f"invalid arguments for evlu {' '.join(argv)}") from None
    try:
        execute(args)
    except CliError as exc:
        raise ExecutionError(str(exc)) from exc
