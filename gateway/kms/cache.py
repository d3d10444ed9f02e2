"""The optional local key cache: KEKs wrapped under a host key, with a TTL.

Off by default.  When on, a KEK fetched from the KMS is stored only as
AES-256-GCM ciphertext under a host key (a 0600 file made on first use, or a
key file the admin provides), bound to its profile and key id, and is used
only while the KMS is unreachable and the entry is younger than the TTL.
The lookup service re-checks such keys once the KMS answers again, so a key
revoked or destroyed meanwhile is honoured then.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .config import Config
from .errors import KmsConfigError

DEFAULT_TTL = 24 * 3600.0
HOST_KEY_BYTES = 32


def _read_host_key(path: Path, create: bool) -> bytearray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise KmsConfigError(f"key cache host key {path} does not exist") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(HOST_KEY_BYTES))
        data = path.read_bytes()
    if len(data) != HOST_KEY_BYTES:
        raise KmsConfigError(f"key cache host key {path} must hold exactly {HOST_KEY_BYTES} bytes")
    return bytearray(data)


class KeyCache:
    """Wrapped KEKs in one JSON file (``cache/keys.json``, 0600)."""

    def __init__(self, path: Path, host_key: bytes | bytearray, ttl: float = DEFAULT_TTL,
                 clock: Callable[[], float] = time.time) -> None:
        if len(host_key) != HOST_KEY_BYTES:
            raise KmsConfigError(f"the key cache's host key must be {HOST_KEY_BYTES} bytes")
        self.path = path
        self.ttl = ttl
        self._aead = AESGCM(bytes(host_key))
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> KeyCache | None:
        """The cache ``gateway.json`` turns on (``key_cache.enabled``), else None."""
        settings = config.settings().key_cache
        if not settings.get("enabled"):
            return None
        ttl = settings.get("ttl", DEFAULT_TTL)
        if not isinstance(ttl, (int, float)) or ttl <= 0:
            raise KmsConfigError("key_cache.ttl must be a positive number of seconds")
        key_file = settings.get("host_key_file")
        key_path = Path(key_file) if key_file else config.cache_dir / "host.key"
        host_key = _read_host_key(key_path, create=not key_file)
        try:
            return cls(config.cache_dir / "keys.json", host_key, float(ttl))
        finally:
            host_key[:] = bytes(len(host_key))

    @staticmethod
    def _aad(profile: str, key_id: str) -> bytes:
        return f"evlu-key-cache\0{profile}\0{key_id}".encode()

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a damaged cache is an empty cache: the KMS stays the authority
        return doc if isinstance(doc, dict) else {}

    def _save(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)

    def put(self, profile: str, key_id: str, kek: bytes | bytearray) -> None:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, bytes(kek), self._aad(profile, key_id))
        with self._lock:
            doc = self._load()
            doc[f"{profile}/{key_id}"] = {"nonce": base64.b64encode(nonce).decode(),
                                          "sealed": base64.b64encode(sealed).decode(),
                                          "stored": self._clock()}
            self._save(doc)

    def get(self, profile: str, key_id: str) -> bytearray | None:
        """The cached KEK, if present, intact and younger than the TTL."""
        with self._lock:
            doc = self._load()
            entry = doc.get(f"{profile}/{key_id}")
            if not isinstance(entry, dict):
                return None
            try:
                stored = float(entry["stored"])
                nonce = base64.b64decode(entry["nonce"], validate=True)
                sealed = base64.b64decode(entry["sealed"], validate=True)
                if self._clock() - stored > self.ttl:
                    raise ValueError("expired")
                return bytearray(self._aead.decrypt(nonce, sealed, self._aad(profile, key_id)))
            except (KeyError, TypeError, ValueError, InvalidTag):
                del doc[f"{profile}/{key_id}"]
                self._save(doc)
                return None

    def drop(self, profile: str, key_id: str) -> None:
        with self._lock:
            doc = self._load()
            if doc.pop(f"{profile}/{key_id}", None) is not None:
                self._save(doc)
