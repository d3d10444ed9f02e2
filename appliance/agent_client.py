"""Host side of the guest agent: JSON lines over QEMU's virtio-serial unix socket.

The protocol is documented in appliance/rootfs/usr/local/sbin/evlu-agent.
"""

from __future__ import annotations

import base64
import json
import shlex
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class AgentError(RuntimeError):
    """The agent did not answer, or refused the request."""


class GuestCommandError(RuntimeError):
    """A guest command failed (non-zero exit or timeout)."""


@dataclass(frozen=True)
class Result:
    """The outcome of one guest command."""

    argv: tuple[str, ...]
    rc: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    seconds: float

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def check(self) -> Result:
        if self.rc != 0 or self.timed_out:
            what = "timed out" if self.timed_out else f"exit {self.rc}"
            raise GuestCommandError(
                f"guest command {shlex.join(self.argv)} {what} after {self.seconds} s\n"
                f"stdout: {self.text[-2000:]}\nstderr: {self.stderr.decode(errors='replace')[-2000:]}")
        return self


class AgentClient:
    """A connection to the guest agent; requests are answered in order, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.path))
            self._sock, self._buffer = sock, b""
        return self._sock

    def _send(self, request: dict) -> int:
        self._next_id += 1
        request["id"] = self._next_id
        self._connect().sendall((json.dumps(request) + "\n").encode())
        return self._next_id

    def _receive(self, rid: int, deadline: float) -> dict | None:
        """The response to request rid, or None at the deadline (older responses are dropped)."""
        sock = self._connect()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                response = json.loads(line)
                if response.get("id") == rid:
                    return response
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                return None
            if not chunk:
                self.close()
                raise AgentError(f"agent socket {self.path} closed (QEMU gone?)")
            self._buffer += chunk

    def ping(self, timeout: float, resend: float = 5.0) -> dict:
        """Wait until the agent answers (resending, since early pings may be lost)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rid = self._send({"op": "ping"})
            response = self._receive(rid, min(deadline, time.monotonic() + resend))
            if response is not None:
                return response
        raise AgentError(f"guest agent did not answer within {timeout:.0f} s")

    def run(self, argv: Sequence[str] | str, timeout: float = 60.0,
            stdin: bytes = b"", check: bool = True) -> Result:
        """Run a command in the guest (a string runs under /bin/sh -c)."""
        args = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        rid = self._send({"op": "run", "argv": args, "timeout": timeout,
                          "stdin": base64.b64encode(stdin).decode()})
        response = self._receive(rid, time.monotonic() + timeout + 30)
        if response is None:
            raise AgentError(f"no answer from the guest agent for {shlex.join(args)}")
        if "error" in response:
            raise AgentError(f"guest agent: {response['error']}")
        result = Result(tuple(args), response["rc"], base64.b64decode(response["stdout"]),
                        base64.b64decode(response["stderr"]), response["timed_out"],
                        response["seconds"])
        return result.check() if check else result
