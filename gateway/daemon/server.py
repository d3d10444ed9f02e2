"""The control socket: a Unix stream socket, 0600 in a 0700 directory, root peers only.

Each connection gets a thread that answers its request lines in order
(:class:`~.control.Dispatcher`).  A peer whose SO_PEERCRED uid is neither 0
nor this process's is answered one ``forbidden`` error and disconnected.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
from pathlib import Path

from .control import Code, ControlError, Dispatcher, LineBuffer, encode_error

_log = logging.getLogger(__name__)
DEFAULT_SOCKET = Path("/run/evlu-gateway/control.sock")
_UCRED = struct.Struct("3i")  # pid, uid, gid


class SocketInUseError(Exception):
    """Another process answers on the socket path (gatewayd already running)."""


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return uid


def _prepare(path: Path) -> None:
    """A 0700 directory of ours, and no stale socket at ``path``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{path.parent} is not owned by this user")
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens
        else:
            raise SocketInUseError(f"{path}: another gatewayd answers there")
        finally:
            probe.close()


class ControlServer:
    """Serves a :class:`Dispatcher` on a Unix socket."""

    def __init__(self, path: Path, dispatcher: Dispatcher) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self.allowed_uids = {0, os.geteuid()}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> ControlServer:
        _prepare(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="gatewayd-control",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, remove the socket, close open connections."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while (sock := self._sock) is not None:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="gatewayd-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            uid = peer_uid(conn)
            if uid not in self.allowed_uids:
                _log.warning("control socket: refused a peer with uid %d", uid)
                error = ControlError(Code.FORBIDDEN, f"uid {uid} may not use gatewayd's control "
                                     "socket: only root may")
                conn.sendall(encode_error(None, error))
                return
            with self._lock:
                self._conns.add(conn)
            try:
                self._converse(conn)
            except OSError:
                pass
            finally:
                with self._lock:
                    self._conns.discard(conn)

    def _converse(self, conn: socket.socket) -> None:
        lines = LineBuffer()
        while data := conn.recv(65536):
            try:
                requests = lines.feed(data)
            except ControlError as exc:
                conn.sendall(encode_error(None, exc))
                return
            for line in requests:
                conn.sendall(self.dispatcher.answer(line))
