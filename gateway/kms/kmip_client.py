"""KMIP key manager on PyKMIP's ``ProxyKmipClient``, over mutual TLS.

PyKMIP's client checks the server's chain but not its host name; here the
TLS context is built by this module (``PROTOCOL_TLS_CLIENT``, the profile's
CA only, ``check_hostname``), so a certificate of the right CA issued for
another host is refused.  One connection is reused across calls; a call that
cannot reach any address of the profile is retried a bounded number of times
with backoff, trying the addresses in failover order.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

from . import compat, pki
from .config import Address, Identity, Profile
from .errors import (KeyNotFoundError, KeyRevokedError, KmsConfigError, KmsError,
                     KmsProtocolError, KmsUnauthorizedError, KmsUnreachableError,
                     KmsUntrustedError)
from .manager import KEK_BYTES, KEK_NAME_PREFIX, PERIMETER_POLICY, Health

T = TypeVar("T")
_log = logging.getLogger(__name__)
_kmip_log = logging.getLogger("kmip")
_kmip_log.addHandler(logging.NullHandler())
_kmip_log.propagate = False  # PyKMIP logs every connection failure at ERROR by itself


def tls_context(profile: Profile, identity: Identity) -> ssl.SSLContext:
    """The client side of mutual TLS: the profile's CA, host name checked, our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(profile.ca))
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    except (OSError, ssl.SSLError) as exc:
        raise KmsConfigError(f"KMS profile {profile.name!r}: cannot load CA {profile.ca} or "
                             f"certificate {identity.cert}: {exc}") from None
    return ctx


@cache
def _proxy_class() -> type:
    base = compat.load("kmip.services.kmip_client").KMIPProxy

    class VerifyingProxy(base):  # type: ignore[misc, valid-type]
        """PyKMIP's proxy with our TLS context (host name verified) instead of its own."""

        context: ssl.SSLContext

        def _create_socket(self, sock: socket.socket) -> None:
            self.socket = self.context.wrap_socket(sock, server_side=False,
                                                   server_hostname=self.host)
            self.socket.settimeout(self.timeout)

    return VerifyingProxy


def _classify(exc: BaseException, address: Address) -> KmsError:
    """A PyKMIP/socket/TLS failure as one of our error types."""
    if isinstance(exc, KmsError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return KmsUntrustedError(f"KMS {address}: its certificate failed verification "
                                 f"({exc.verify_message}); check the profile's CA and address")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower()
        if "alert" in reason or "certificate" in reason:
            return KmsUnauthorizedError(f"KMS {address} refused this gateway's certificate "
                                        f"({exc.reason}); is it enrolled with this KMS?")
        return KmsUnreachableError(f"KMS {address}: TLS failure ({exc.reason or exc})")
    if isinstance(exc, (OSError, EOFError)):
        return KmsUnreachableError(f"KMS {address} unreachable: {exc or type(exc).__name__}")
    failure = compat.load("kmip.pie.exceptions").KmipOperationFailure
    enums = compat.load("kmip.core.enums")
    if isinstance(exc, failure):
        if exc.reason == enums.ResultReason.PERMISSION_DENIED:
            return KmsUnauthorizedError(f"KMS {address} denied access: {exc.message}")
        if exc.reason == enums.ResultReason.ITEM_NOT_FOUND:
            return KeyNotFoundError(f"KMS {address}: no such key (never existed or "
                                    f"destroyed): {exc.message}")
        return KmsError(f"KMS {address} refused the operation: {exc.reason.name}: {exc.message}")
    name = type(exc).__name__
    if name in ("ConnectionClosed", "ClientConnectionNotOpen", "ClientConnectionFailure"):
        return KmsUnreachableError(f"KMS {address}: connection lost ({name})")
    return KmsProtocolError(f"KMS {address}: unexpected answer ({name}: {exc})")


class KmipKeyManager:
    """A :class:`~.manager.KeyManager` on one KMIP profile, acting as one gateway identity."""

    def __init__(self, profile: Profile, identity: Identity, *, attempts: int = 3,
                 backoff: float = 0.2) -> None:
        self.profile = profile
        self.profile_name = profile.name
        self.identity = identity
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self._context: ssl.SSLContext | None = None
        self._client: Any = None
        self._address: Address | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> KmipKeyManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<KmipKeyManager profile={self.profile.name} gateway={self.identity.name}>"

    # -- connection -------------------------------------------------------------

    def _connect(self) -> tuple[Any, Address]:
        if self._context is None:
            cert = pki.load_pair(self.identity.cert, self.identity.key).cert
            if not pki.has_client_auth(cert):
                raise KmsUnauthorizedError(
                    f"certificate {self.identity.cert} has no clientAuth usage: a KMIP server "
                    "refuses it; enroll the gateway with 'evlu kms enroll'")
            self._context = tls_context(self.profile, self.identity)
        client_mod = compat.load("kmip.pie.client")
        errors: list[KmsError] = []
        for address in self.profile.addresses:
            proxy = _proxy_class()(host=address.host, port=address.port,
                                   timeout=max(1, round(self.profile.timeout)),
                                   config_file=None)
            proxy.context = self._context
            proxy.timeout = self.profile.timeout
            client = client_mod.ProxyKmipClient(hostname=address.host, port=address.port)
            client.proxy = proxy
            try:
                client.open()
            except Exception as exc:  # noqa: BLE001 - classified below
                error = _classify(exc, address)
                if not error.transient:
                    raise error from None
                errors.append(error)
                continue
            return client, address
        raise KmsUnreachableError("; ".join(str(e) for e in errors) or "no KMS address")

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - the socket is gone either way
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _call(self, op: Callable[[Any], T]) -> T:
        """Run ``op(client)``, reconnecting and retrying while the KMS is unreachable."""
        with self._lock:
            last: KmsError | None = None
            for attempt in range(self.attempts):
                if attempt:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                try:
                    if self._client is None:
                        self._client, self._address = self._connect()
                    return op(self._client)
                except Exception as exc:  # noqa: BLE001 - classified below
                    error = _classify(exc, self._address or self.profile.addresses[0])
                    if not error.transient:
                        if isinstance(exc, (OSError, EOFError)):
                            self._drop()
                        raise error from None
                    self._drop()
                    last = error
            assert last is not None
            raise last

    # -- operations ---------------------------------------------------------------

    def provision(self, label: str) -> str:
        enums = compat.load("kmip.core.enums")

        def op(client: Any) -> str:
            uid = client.create(
                enums.CryptographicAlgorithm.AES, KEK_BYTES * 8,
                operation_policy_name=PERIMETER_POLICY, name=f"{KEK_NAME_PREFIX}:{label}",
                cryptographic_usage_mask=[enums.CryptographicUsageMask.WRAP_KEY,
                                          enums.CryptographicUsageMask.UNWRAP_KEY])
            client.activate(uid)
            return str(uid)
        return self._call(op)

    def find(self, label: str) -> list[str]:
        """Ids of the KEKs provisioned for ``label`` (a volume UUID) that this gateway may see."""
        enums = compat.load("kmip.core.enums")

        def op(client: Any) -> list[str]:
            name = client.attribute_factory.create_attribute(enums.AttributeType.NAME,
                                                             f"{KEK_NAME_PREFIX}:{label}")
            return [str(uid) for uid in client.locate(attributes=[name])]
        return self._call(op)

    def _state(self, client: Any, key_id: str) -> str:
        _uid, attributes = client.get_attributes(key_id, ["State"])
        for attribute in attributes:
            if attribute.attribute_name.value == "State":
                return str(attribute.attribute_value.value.name)
        raise KmsProtocolError(f"KMS gave no State for key {key_id}")

    def fetch(self, key_id: str) -> bytearray:
        def op(client: Any) -> bytearray:
            state = self._state(client, key_id)
            if state != "ACTIVE":
                raise KeyRevokedError(f"key {key_id} is {state.lower()} in the KMS")
            obj = client.get(key_id)
            value = getattr(obj, "value", None)
            if not isinstance(value, (bytes, bytearray)) or len(value) != KEK_BYTES:
                raise KmsProtocolError(f"KMS returned no {KEK_BYTES}-byte symmetric key for "
                                       f"{key_id}")
            return bytearray(value)
        return self._call(op)

    def state(self, key_id: str) -> str:
        """The key's KMIP state name (ACTIVE, DEACTIVATED, ...)."""
        return self._call(lambda client: self._state(client, key_id))

    def deactivate(self, key_id: str) -> None:
        enums = compat.load("kmip.core.enums")
        self._call(lambda client: client.revoke(enums.RevocationReasonCode.SUPERSEDED, key_id,
                                                "replaced by an evlu rotation"))

    def destroy(self, key_id: str) -> None:
        enums = compat.load("kmip.core.enums")

        def op(client: Any) -> None:
            if self._state(client, key_id) == "ACTIVE":
                client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, key_id,
                              "evlu shred")
            client.destroy(key_id)
        self._call(op)

    def health(self) -> Health:
        start = time.monotonic()
        try:
            self._call(lambda client: client.locate(maximum_items=1))
        except KmsError as exc:
            return Health(False, str(self._address or self.profile.addresses[0]),
                          (time.monotonic() - start) * 1e3, str(exc))
        return Health(True, str(self._address), (time.monotonic() - start) * 1e3, "ok")
