"""Key managers by profile name, for one gateway identity."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .config import Config, Identity, Profile
from .kmip_client import KmipKeyManager
from .manager import KeyManager

Factory = Callable[[Profile, Identity], KeyManager]


class ManagerPool:
    """Opens one key manager per profile on first use and keeps it (connection reuse)."""

    def __init__(self, config: Config, gateway: str | None = None,
                 factory: Factory = KmipKeyManager, override: str | None = None) -> None:
        self.config = config
        self.override = override
        self.gateway = gateway
        self._factory = factory
        self._managers: dict[str, KeyManager] = {}
        self._lock = threading.Lock()

    def profile_for(self, kms: str | None) -> str:
        """The profile a token's ``kms`` names if this gateway has it, else the default.

        A replica carries the profile name of the site that made it; a site
        without a profile of that name looks the key id up in its default KMS;
        ``override`` (a command's ``--kms``) wins over both."""
        if self.override:
            return self.config.profile(self.override).name
        if kms and kms in self.config.profile_names():
            return kms
        return self.config.profile(None).name

    def get(self, profile: str | None = None) -> KeyManager:
        name = self.config.profile(profile).name if profile is None else profile
        with self._lock:
            manager = self._managers.get(name)
            if manager is None:
                prof = self.config.profile(name)
                manager = self._factory(prof, self.config.credentials(prof, self.gateway))
                self._managers[name] = manager
            return manager

    @property
    def identity_name(self) -> str:
        try:
            return self.config.identity(self.gateway).name
        except Exception:  # noqa: BLE001 - only for labels (audit), never for access
            return self.gateway or "unknown"

    def close(self) -> None:
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        for manager in managers:
            manager.close()
