"""A small client of gatewayd's control socket (the CLI and the targetcli extension use it)."""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any

from .control import LineBuffer, Request, encode_request, parse_response
from .server import DEFAULT_SOCKET

SOCKET_ENV = "EVLU_GATEWAYD_SOCKET"


class NotRunningError(Exception):
    """Nobody answers on the control socket."""


def default_socket() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


class ControlClient:
    """One connection; ``call`` sends a request and returns its result (ControlError
    when gatewayd answers an error)."""

    def __init__(self, path: Path | None = None, timeout: float = 60.0) -> None:
        self.path = path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise NotRunningError(f"gatewayd is not running (nothing answers on {self.path}: "
                                  f"{exc.strerror}); start it with 'systemctl start "
                                  "evlu-gatewayd' or 'python -m gateway.daemon'") from None
        except OSError:
            self._sock.close()
            raise
        self._ids = itertools.count(1)
        self._lines = LineBuffer()
        self._pending: list[bytes] = []

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, method: str, **params: Any) -> Any:
        rid = next(self._ids)
        self._sock.sendall(encode_request(Request(rid, method, params)))
        while True:
            line = self._next_line()
            got, result = parse_response(line)  # raises the answer's error
            if got == rid:
                return result

    def _next_line(self) -> bytes:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError(f"gatewayd closed the connection on {self.path}")
            self._pending.extend(self._lines.feed(data))
        return self._pending.pop(0)


def call(method: str, path: Path | None = None, **params: Any) -> Any:
    """One request on a connection of its own."""
    with ControlClient(path) as client:
        return client.call(method, **params)
