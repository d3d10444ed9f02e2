"""Key managers: the KMIP client, the embedded PyKMIP server and its PKI,
profiles and identities, the key lookup service, the key cache, the audit log."""

from .config import Address, Config, Identity, Profile
from .errors import (KeyNotFoundError, KeyRevokedError, KmsConfigError, KmsError,
                     KmsProtocolError, KmsUnauthorizedError, KmsUnreachableError,
                     KmsUntrustedError)
from .manager import Health, KeyManager

__all__ = [
    "Address", "Config", "Health", "Identity", "KeyManager", "KeyNotFoundError",
    "KeyRevokedError", "KmsConfigError", "KmsError", "KmsProtocolError",
    "KmsUnauthorizedError", "KmsUnreachableError", "KmsUntrustedError", "Profile",
]
