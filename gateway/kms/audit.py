"""The audit log: one JSON line per key event, never key bytes.

Fields: ``time`` (UTC, ISO 8601), ``gateway`` (the identity acting),
``event`` (provision, lookup, rotate, bind, unbind, deactivate, destroy,
format, ...), ``outcome`` (ok, granted, refused, unreachable, error),
``volume`` (the LUKS2 UUID), ``key_id``, ``kms`` (the profile) and free
details.  Lines are appended with O_APPEND (atomic per line); the file is 0600.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends audit records to ``path`` (or nowhere, when ``path`` is None)."""

    def __init__(self, path: Path | None, gateway: str) -> None:
        self.path = path
        self.gateway = gateway
        self._lock = threading.Lock()

    def record(self, event: str, *, outcome: str = "ok", volume: str | None = None,
               key_id: str | None = None, kms: str | None = None, **detail: Any) -> None:
        """Append one event.  ``detail`` values must be JSON-serialisable and not secret."""
        if self.path is None:
            return
        doc: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "gateway": self.gateway, "event": event, "outcome": outcome}
        for name, value in (("volume", volume), ("key_id", key_id), ("kms", kms)):
            if value is not None:
                doc[name] = value
        for name, value in detail.items():
            if isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"audit detail {name!r} is binary: never log key material")
            doc[name] = value
        line = (json.dumps(doc, sort_keys=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


def read_recent(path: Path, limit: int, *, volume: str | None = None) -> list[dict[str, Any]]:
    """The last ``limit`` records of the audit log at ``path`` (oldest first),
    only those of ``volume`` when given; a missing log has none, a torn line is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for line in reversed(lines):
        if len(records) >= limit:
            break
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and (volume is None or doc.get("volume") == volume):
            records.append(doc)
    return records[::-1]
