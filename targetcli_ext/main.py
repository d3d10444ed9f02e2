"""``targetcli-evlu``: stock targetcli with an /encryption node, interactive or one command.

``targetcli-evlu`` enters the shell; ``targetcli-evlu PATH COMMAND ARGS...``
(e.g. ``targetcli-evlu /encryption status``) runs one command and exits with
status 1 when it fails.  Like targetcli it serialises with other targetcli
processes on /var/run/targetcli.lock.
"""

from __future__ import annotations

import fcntl
import os
import sys

from configshell_fb import ConfigShell, ExecutionError
from rtslib_fb import RTSLibError
from targetcli import __version__ as targetcli_version

from .root import EvluRoot

LOCK_FILE = "/var/run/targetcli.lock"


class EvluShell(ConfigShell):
    """targetcli's preferences (the stock ``targetcli`` script's), in ~/.targetcli."""

    default_prefs = {
        "color_path": "magenta", "color_command": "cyan", "color_parameter": "magenta",
        "color_keyword": "cyan", "completions_in_columns": True, "logfile": None,
        "loglevel_console": "info", "loglevel_file": "debug9", "color_mode": True,
        "prompt_length": 30, "tree_max_depth": 0, "tree_status_mode": True,
        "tree_round_nodes": True, "tree_show_root": True,
        "export_backstore_name_as_model": True, "auto_enable_tpgt": True,
        "auto_add_mapped_luns": True, "auto_cd_after_create": False,
        "auto_save_on_exit": True, "max_backup_files": "10", "auto_add_default_portal": True,
        "auto_use_daemon": False, "daemon_use_batch_mode": False,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if args in (["-v"], ["--version"]):
        print(f"targetcli-evlu (targetcli {targetcli_version})")
        return 0
    shell = EvluShell(os.getenv("TARGETCLI_HOME", "~/.targetcli"))
    is_root = os.getuid() == 0
    with open(LOCK_FILE, "w+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            root = EvluRoot(shell, as_root=is_root)
            root.refresh()
        except Exception as exc:  # configfs, modules, permissions: say it, as targetcli does
            shell.con.display(shell.con.render_text(str(exc), "red"))
            if not is_root:
                shell.con.display(shell.con.render_text("Retry as root.", "red"))
            return 1
        if args:
            try:
                shell.run_cmdline(" ".join(args))
            except (ExecutionError, RTSLibError) as exc:
                print(str(exc), file=sys.stderr)
                return 1
            return 0
        shell.con.display(f"targetcli-evlu shell (targetcli {targetcli_version})\n"
                          "For help on commands, type 'help'; the eVLUs are under /encryption.\n")
        while not shell._exit:
            try:
                shell.run_interactive()
            except (RTSLibError, ExecutionError) as exc:
                shell.log.error(str(exc))
        if shell.prefs["auto_save_on_exit"] and is_root:
            try:
                root.ui_command_saveconfig()
            except (RTSLibError, ExecutionError) as exc:
                shell.log.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
