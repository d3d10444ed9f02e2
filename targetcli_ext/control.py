"""gatewayd, as the shell sees it: its control API, errors turned into shell errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from configshell_fb import ExecutionError

from gateway.daemon.client import ControlClient, NotRunningError
from gateway.daemon.control import ControlError

from .inventory import Evlu, Exports, from_gatewayd


class Gatewayd:
    """Calls on gatewayd's control socket (``None``: $EVLU_GATEWAYD_SOCKET or the default)."""

    def __init__(self, socket: Path | None = None) -> None:
        self.socket = socket

    def call(self, method: str, **params: Any) -> Any:
        """One request; an ExecutionError that says what to do when it fails."""
        try:
            with ControlClient(self.socket) as client:
                return client.call(method, params)
        except NotRunningError as exc:
            raise ExecutionError(str(exc)) from None
        except ControlError as exc:
            raise ExecutionError(f"gatewayd: {exc.message}") from None
        except OSError as exc:
            raise ExecutionError(f"gatewayd's control socket failed: {exc}") from None

    def evlus(self, exports: Exports) -> list[Evlu]:
        """Every LUN gatewayd serves, by name, with the LUNs that export it."""
        lio = exports()
        return [from_gatewayd(doc, lio) for doc in self.call("luns")]
