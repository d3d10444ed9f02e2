"""Liveness and readiness of gatewayd, from facts the daemon gathers (sans-IO).

* live: the housekeeping loop beat recently, the control server and the key
  lookup worker run, and no served device's ring thread died.
* ready: live, LIO restored (the reconciler's last apply succeeded, or LIO
  is not managed by gatewayd), and every LUN of the LIO configuration is
  served by a TCMU device (attached; not necessarily keyed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Facts:
    beat_age: float  # seconds since the housekeeping loop last ran
    beat_limit: float
    control_alive: bool
    lookups_alive: bool
    broken_devices: list[str] = field(default_factory=list)
    lio: str | None = None  # None: restored or not managed; else why not
    unattached: list[str] = field(default_factory=list)  # configured LUNs no device serves


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    checks: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"live": self.live, "ready": self.ready, "checks": self.checks}


def assess(facts: Facts) -> Health:
    def check(ok: bool, detail: str) -> dict[str, Any]:
        return {"ok": ok, "detail": detail}

    liveness = {
        "loop": check(facts.beat_age <= facts.beat_limit,
                      f"housekeeping ran {facts.beat_age:.1f} s ago"),
        "control": check(facts.control_alive, "accepting" if facts.control_alive else
                         "the control server thread stopped"),
        "key_lookups": check(facts.lookups_alive, "running" if facts.lookups_alive else
                             "the key lookup worker stopped"),
        "rings": check(not facts.broken_devices, "ring threads running" if not
                       facts.broken_devices else "ring stopped: " +
                       ", ".join(facts.broken_devices)),
    }
    readiness = {
        "lio": check(facts.lio is None, facts.lio or "restored (or not managed)"),
        "luns": check(not facts.unattached, "every configured LUN is attached" if not
                      facts.unattached else "not attached: " + ", ".join(facts.unattached)),
    }
    live = all(c["ok"] for c in liveness.values())
    ready = live and all(c["ok"] for c in readiness.values())
    return Health(live, ready, {**liveness, **readiness})
