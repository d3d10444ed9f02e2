"""Where ``evlu`` commands get KEKs: a ``--kek-file`` (offline), or the KMS.

Through the KMS a command acts exactly as the gateway does: it opens the
volume with the key lookup service as its key source, waits for the volume
to leave WAITING_FOR_KEY, and records every key event in the audit log.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from ..kms import Config, KmsError, KmsUnreachableError
from ..kms.audit import AuditLog
from ..kms.cache import KeyCache
from ..kms.lookup import KeyLookupService
from ..kms.manager import KeyManager
from ..kms.pool import ManagerPool
from ..volume import State, Volume


@dataclass
class KmsSession:
    """The KMS side of one command: profiles, identity, lookups, audit."""

    config: Config
    pool: ManagerPool
    audit: AuditLog
    lookups: KeyLookupService

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, require_identity: bool = True) -> KmsSession:
        """``require_identity``: fail at once, with advice, when this gateway is not
        enrolled (a daemon that may serve plain LUNs starts anyway)."""
        config = Config(args.config_dir)
        pool = ManagerPool(config, args.gateway, override=getattr(args, "lookup_kms", None))
        if require_identity:
            config.identity(args.gateway)
        if pool.override:
            config.profile(pool.override)
        audit = AuditLog(config.audit_path, pool.identity_name)
        lookups = KeyLookupService(pool, audit=audit, cache=KeyCache.from_config(config))
        return cls(config, pool, audit, lookups.start())

    def close(self) -> None:
        self.lookups.stop()

    def manager(self, profile: str | None) -> KeyManager:
        return self.pool.get(profile or None)

    def profile_name(self, profile: str | None) -> str:
        return self.config.profile(profile or None).name

    def wait_unlocked(self, vol: Volume, timeout: float) -> None:
        """Wait for the lookups of ``vol``; raise a KmsError saying why it stays locked."""
        deadline = time.monotonic() + timeout
        while vol.state == State.WAITING_FOR_KEY and time.monotonic() < deadline:
            time.sleep(0.02)
        if vol.state == State.ENCRYPTED:
            return
        if vol.state == State.WAITING_FOR_KEY:
            raise KmsUnreachableError(f"{vol.name}: no KMS answered within {timeout:g} s "
                                      f"({vol.reason}); check 'evlu kms status'")
        raise KmsRefusal(f"{vol.name}: {vol.state.value}: {vol.reason}",
                         wrong_key="does not open" in vol.reason and "refused" not in vol.reason)


class KmsRefusal(KmsError):
    """The volume stays locked: the KMS refused, or its key does not open the volume."""

    def __init__(self, message: str, *, wrong_key: bool) -> None:
        super().__init__(message)
        self.wrong_key = wrong_key
