"""A real embedded PyKMIP server on 127.0.0.1, run as `evlu kms serve` in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.kms import Config
from gateway.kms import server as kms_server
from gateway.kms.kmip_client import KmipKeyManager
from gateway.kms.pool import ManagerPool

EVLU = [sys.executable, "-m", "gateway.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KmsEnv:
    """A configuration directory with an initialised embedded KMS and enrolled gateways."""

    def __init__(self, root: Path, gateways: tuple[str, ...] = ("gw-a", "gw-b")) -> None:
        self.root = root
        self.port = free_port()
        self.config = Config(root)
        kms_server.init(self.config, port=self.port)
        for name in gateways:
            kms_server.enroll(self.config, name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "serve.out"

    def env(self, gateway: str | None = None) -> dict[str, str]:
        env = dict(os.environ, EVLU_CONFIG_DIR=str(self.root))
        env.pop("EVLU_GATEWAY", None)
        if gateway:
            env["EVLU_GATEWAY"] = gateway
        return env

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([*EVLU, "kms", "serve"], env=self.env(), stdout=out,
                                     stderr=subprocess.STDOUT, cwd=self.root)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"evlu kms serve exited: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"evlu kms serve not listening after {timeout} s: "
                           f"{self.log.read_text()}")

    def stop(self) -> float:
        """SIGTERM the server; returns how long it took to exit."""
        if self.proc is None:
            return 0.0
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("evlu kms serve ignored SIGTERM for 30 s") from None
        finally:
            self.proc = None
        return time.monotonic() - start

    def manager(self, gateway: str, **kwargs: object) -> KmipKeyManager:
        return KmipKeyManager(self.config.profile(), self.config.identity(gateway),
                              **kwargs)  # type: ignore[arg-type]

    def pool(self, gateway: str) -> ManagerPool:
        return ManagerPool(self.config, gateway)

    def evlu(self, *args: str, gateway: str | None = None, check: bool = False,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EVLU, *args], env=self.env(gateway), capture_output=True,
                              text=True, timeout=timeout, check=check, cwd=self.root)
