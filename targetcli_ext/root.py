"""The shell's root: stock targetcli's tree plus /encryption."""

from __future__ import annotations

from configshell_fb import ConfigShell
from targetcli import UIRoot
from targetcli.ui_root import default_save_file

from .control import Gatewayd
from .encryption import UIEncryption
from .lio import exports
from .stock import RtsSteps


class EvluRoot(UIRoot):
    """
    The targetcli hierarchy root, with the encrypted LUNs of this gateway
    under /encryption.
    """

    def __init__(self, shell: ConfigShell, as_root: bool = False,
                 gatewayd: Gatewayd | None = None) -> None:
        super().__init__(shell, as_root=as_root)
        self.gatewayd = gatewayd or Gatewayd()

    def refresh(self) -> None:
        super().refresh()
        UIEncryption(self, self.gatewayd, lambda: exports(self.rtsroot), RtsSteps(self.rtsroot))

    def ui_command_saveconfig(self, savefile: str = default_save_file) -> None:
        """
        Saves the current configuration to a file so that it can be restored
        on next boot, and has gatewayd save its LUN configuration (the eVLUs
        and their exports) as well.
        """
        super().ui_command_saveconfig(savefile)
        saved = self.gatewayd.call("save")
        self.shell.log.info(f"gatewayd configuration saved to {saved.get('path', '?')}")
