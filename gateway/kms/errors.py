"""What can go wrong talking to a key manager, as distinct types.

A lookup that fails with a *transient* error (:class:`KmsUnreachableError`)
is retried; every other :class:`KmsError` is a definite answer (the volume
goes to NO_KEY and the lookup is not retried in a loop).
"""

from __future__ import annotations


class KmsError(Exception):
    """A key-manager operation failed; the message says what to do."""

    transient = False


class KmsConfigError(KmsError):
    """Missing or malformed KMS profile, identity or embedded-server files."""


class KmsUnreachableError(KmsError):
    """No KMS address answered (refused, timed out, connection lost)."""

    transient = True


class KmsUnauthorizedError(KmsError):
    """The KMS refused this gateway (TLS handshake or permission denied)."""


class KmsUntrustedError(KmsError):
    """The KMS's certificate failed verification (CA or host name)."""


class KeyNotFoundError(KmsError):
    """No such key in the KMS (never existed, or destroyed)."""


class KeyRevokedError(KmsError):
    """The key exists but is not active (revoked, deactivated, compromised)."""


class KmsProtocolError(KmsError):
    """The KMS answered something this client cannot use."""
