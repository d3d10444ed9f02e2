"""What the /encryption tree shows of one eVLU: gatewayd's view of it, LIO's exports."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STATES = ("ENCRYPTED", "WAITING_FOR_KEY", "NO_KEY", "UNKNOWN", "UNENCRYPTED")

#: backing-store real path -> the LUNs exporting it ("IQN/tpgN/lunM"); None without LIO
Exports = Callable[[], dict[str, list[str]] | None]


@dataclass(frozen=True)
class Binding:
    key_id: str
    kms: str


@dataclass
class Evlu:
    """One LUN gatewayd serves."""

    name: str
    path: str
    state: str
    reason: str = ""
    uuid: str = ""
    bindings: list[Binding] = field(default_factory=list)
    sector_size: int | None = None
    capacity: int | None = None  # bytes an initiator sees
    exports: list[str] = field(default_factory=list)

    @property
    def key_ids(self) -> list[str]:
        return [b.key_id for b in self.bindings]

    def summary(self) -> str:
        """One line for ``ls``: state, keys, size, sector size, exports."""
        keys = ", ".join(f"key {b.key_id} (KMS {b.kms})" for b in self.bindings) or "no key"
        size = human_size(self.capacity) if self.capacity is not None else "size ?"
        sector = f"{self.sector_size}B sectors" if self.sector_size else "sector size ?"
        exported = "exported as " + ", ".join(self.exports) if self.exports else "not exported"
        return f"{self.state}, {keys}, {size}, {sector}, {exported}"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def from_gatewayd(doc: dict[str, Any], exports: dict[str, list[str]] | None) -> Evlu:
    """An Evlu from one entry of gatewayd's ``luns`` answer.  Without LIO's exports
    (off the appliance) the target gatewayd was asked to export it to stands in."""
    if exports is None:
        lio = [f"{doc['target']} (configured)"] if doc.get("target") else []
    else:
        lio = exports.get(os.path.realpath(doc["path"]), [])
    return Evlu(name=doc["name"], path=doc["path"], state=doc["state"],
                reason=doc.get("reason") or "", uuid=doc.get("uuid") or "",
                bindings=[Binding(b["key_id"], b["kms"]) for b in doc.get("key_ids", [])],
                sector_size=doc.get("block_size"), capacity=doc.get("size"), exports=lio)
