"""The key-manager interface the gateway programs against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

KEK_BYTES = 32  # AES-256 KEKs
KEK_NAME_PREFIX = "evlu-kek"
# The operation policy eVLU KEKs are created under (see gateway.kms.server).
PERIMETER_POLICY = "evlu-perimeter"


@dataclass(frozen=True)
class Health:
    """What a health probe found."""

    ok: bool
    address: str
    latency_ms: float
    detail: str


class KeyManager(Protocol):
    """Provision, fetch and retire KEKs by id.  Errors are :class:`~.errors.KmsError`."""

    profile_name: str

    def provision(self, label: str) -> str:
        """Create and activate a new AES-256 KEK named ``evlu-kek:<label>``; return its id."""

    def fetch(self, key_id: str) -> bytearray:
        """The KEK's bytes, if it exists, is active, and this gateway may have it."""

    def deactivate(self, key_id: str) -> None:
        """Retire a KEK after a rotation (KMIP Revoke, reason superseded)."""

    def destroy(self, key_id: str) -> None:
        """Revoke and destroy a KEK: every copy of data bound only to it is gone."""

    def health(self) -> Health:
        """Whether the KMS answers this gateway, and how fast."""

    def close(self) -> None:
        """Drop the connection."""
