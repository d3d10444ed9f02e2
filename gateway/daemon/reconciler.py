"""The seam between gatewayd and the LIO reconciler (``gateway.lio``).

gatewayd drives LIO through one small protocol, :class:`Reconciler`, given
at construction; it never reads or writes the LIO configuration itself.
Without one, the control API's ``apply`` answers "LIO configuration not
available", and ``lun.add`` serves the LUN's volume (header read, key looked
up) without exporting it.
"""

from __future__ import annotations

from typing import Protocol

NOT_AVAILABLE = "LIO configuration not available (gateway.lio is not part of this gatewayd)"


class Reconciler(Protocol):
    def apply(self) -> list[str]:
        """Load the LIO configuration and make LIO match it; the changes made.
        Every failure is a RuntimeError saying why."""

    def add_lun(self, path: str, name: str, target: str | None) -> list[str]:
        """Add a ``user:evlu`` LUN entry for ``path`` (under ``target``, else the
        configuration's default target) to the configuration and apply it.
        A LookupError when there is no target to add it to; any failure a RuntimeError."""

    def configured(self) -> dict[str, str]:
        """The LUNs the configuration exports: backing-store path -> LUN name."""

    def save(self) -> dict[str, object]:
        """Persist what is exported; where (``path``) and which stores (``luns``)."""
