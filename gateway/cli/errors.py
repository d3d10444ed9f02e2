"""Exit codes of ``evlu`` (listed in ``evlu --help``) and the error that carries one."""

from __future__ import annotations

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_HEADER = 0, 1, 2, 3
EXIT_WRONG_KEY, EXIT_DAMAGED, EXIT_UNUSABLE, EXIT_REFUSED = 4, 5, 6, 7
EXIT_KMS_UNREACHABLE, EXIT_KMS_REFUSED, EXIT_NOT_RUNNING = 8, 9, 10


EXIT_CODES_HELP = """\
Exit codes:
  0 success            4 the key does not open the volume
  1 error (I/O, ...)   5 header damaged: one copy bad (``evlu check --repair`` fixes it)
  2 usage error/config 6 metadata unusable (no valid copy, or an unsupported feature)
  3 no eVLU header     7 refused: the operation needs confirmation (--yes/--confirm/--force)
  8 KMS unreachable    9 the KMS refused this gateway, or the key is revoked/destroyed
  10 gatewayd is not running (evlu daemon/lun/rescan)
"""


class CliError(Exception):
    """An error with the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code
