"""The key lookup service: WAITING_FOR_KEY volumes become ENCRYPTED or NO_KEY.

One worker thread serves a schedule of lookups keyed by (profile, key id), so
volumes sharing a key cause one KMS call.  While the KMS is unreachable a
lookup is retried with exponential backoff capped at ``retry_max`` seconds
(the volume stays WAITING_FOR_KEY and unlocks within that cap of the KMS's
return); a definite refusal is answered at once and remembered for
``refusal_hold`` seconds, so repeated requests never hammer the KMS.  With the
key cache on, an unreachable KMS is answered from the cache and the key is
re-checked once the KMS answers again: a key revoked or destroyed meanwhile is
withdrawn from its volumes then.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..format import EvluToken
from .audit import AuditLog
from .cache import KeyCache
from .errors import KmsError
from .pool import ManagerPool

if TYPE_CHECKING:
    from ..volume import Volume

_log = logging.getLogger(__name__)
Key = tuple[str, str]  # (profile, key id)


@dataclass
class _Lookup:
    profile: str
    key_id: str
    volumes: dict[int, Volume] = field(default_factory=dict)
    delay: float = 0.0
    revalidate: dict[int, Volume] = field(default_factory=dict)  # unlocked from the cache


def _uuid(volume: Volume) -> str | None:
    header = volume.header
    return header.uuid if header is not None else None


class KeyLookupService:
    """A :class:`~gateway.volume.keys.KeySource` backed by KMS profiles."""

    def __init__(self, pool: ManagerPool, *, audit: AuditLog | None = None,
                 cache: KeyCache | None = None, retry_min: float = 0.25,
                 retry_max: float = 2.0, refusal_hold: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.audit = audit or AuditLog(None, pool.identity_name)
        self.cache = cache
        self.retry_min, self.retry_max, self.refusal_hold = retry_min, retry_max, refusal_hold
        self._clock = clock
        self._lookups: dict[Key, _Lookup] = {}
        self._refusals: dict[Key, tuple[float, str]] = {}
        self._schedule: list[tuple[float, int, Key]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.kms_calls = 0  # lookups that reached a key manager (for tests and metrics)

    def __enter__(self) -> KeyLookupService:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> KeyLookupService:
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="evlu-key-lookup",
                                                daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.pool.close()

    @property
    def running(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def pending(self) -> int:
        """Lookups not answered yet (including cache revalidations)."""
        with self._cond:
            return len(self._lookups)

    # -- KeySource ----------------------------------------------------------------

    def request(self, volume: Volume, bindings: list[EvluToken]) -> None:
        """Queue lookups of ``bindings``' key ids for ``volume`` (never blocks on the KMS)."""
        with self._cond:
            for token in bindings:
                try:
                    profile = self.pool.profile_for(token.kms)
                except KmsError:  # no such profile: the worker's lookup refuses it, with why
                    profile = self.pool.override or token.kms or ""
                key = (profile, token.key_id)
                lookup = self._lookups.get(key)
                if lookup is None:
                    lookup = self._lookups[key] = _Lookup(profile, token.key_id)
                    self._push(key, 0.0)
                lookup.volumes[id(volume)] = volume
            self._cond.notify_all()

    def _push(self, key: Key, delay: float) -> None:
        heapq.heappush(self._schedule, (self._clock() + delay, next(self._seq), key))

    # -- worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    if self._schedule and self._schedule[0][0] <= self._clock():
                        break
                    timeout = self._schedule[0][0] - self._clock() if self._schedule else None
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                _due, _seq, key = heapq.heappop(self._schedule)
                lookup = self._lookups.get(key)
                if lookup is None:
                    continue
                refusal = self._refusals.get(key)
                if refusal is not None and self._clock() - refusal[0] < self.refusal_hold:
                    del self._lookups[key]
                    volumes = list(lookup.volumes.values())
                    reason = refusal[1]
                else:
                    volumes, reason = [], ""
            if volumes:  # refused recently: answer without asking the KMS again
                for volume in volumes:
                    volume.refuse_key(lookup.key_id, reason)
                continue
            try:
                self._lookup(key, lookup)
            except Exception:  # noqa: BLE001 - the worker must survive any bug in one lookup
                _log.exception("key lookup of %s failed unexpectedly", lookup.key_id)
                with self._cond:
                    self._retry(key, lookup)

    def _retry(self, key: Key, lookup: _Lookup) -> None:
        lookup.delay = min(self.retry_max, max(self.retry_min, lookup.delay * 2))
        self._push(key, lookup.delay)

    def _take(self, key: Key, lookup: _Lookup) -> tuple[list[Volume], list[Volume]]:
        with self._cond:
            del self._lookups[key]
            return list(lookup.volumes.values()), list(lookup.revalidate.values())

    def _lookup(self, key: Key, lookup: _Lookup) -> None:
        profile, key_id = key
        self.kms_calls += 1
        try:
            kek = self.pool.get(profile).fetch(key_id)
        except KmsError as exc:
            if exc.transient:
                self._unreachable(key, lookup, exc)
            else:
                self._refused(key, lookup, exc)
            return
        try:
            if self.cache is not None:
                self.cache.put(profile, key_id, kek)
            volumes, revalidated = self._take(key, lookup)
            with self._cond:
                self._refusals.pop(key, None)
            for volume in volumes:
                volume.offer_kek(key_id, bytes(kek))
                self.audit.record("lookup", outcome="granted", volume=_uuid(volume),
                                  key_id=key_id, kms=profile, source="kms",
                                  state=volume.state.value)
            for volume in revalidated:
                self.audit.record("revalidate", outcome="granted", volume=_uuid(volume),
                                  key_id=key_id, kms=profile)
        finally:
            kek[:] = bytes(len(kek))

    def _refused(self, key: Key, lookup: _Lookup, exc: KmsError) -> None:
        profile, key_id = key
        reason = f"KMS {profile!r} refused key {key_id}: {exc}"
        if self.cache is not None:
            self.cache.drop(profile, key_id)
        volumes, revalidated = self._take(key, lookup)
        with self._cond:
            self._refusals[key] = (self._clock(), reason)
        for volume in volumes:
            volume.refuse_key(key_id, reason)
            self.audit.record("lookup", outcome="refused", volume=_uuid(volume), key_id=key_id,
                              kms=profile, error=type(exc).__name__, reason=str(exc))
        for volume in revalidated:
            volume.withdraw_key(key_id, reason)
            self.audit.record("revalidate", outcome="refused", volume=_uuid(volume),
                              key_id=key_id, kms=profile, error=type(exc).__name__,
                              reason=str(exc))

    def _unreachable(self, key: Key, lookup: _Lookup, exc: KmsError) -> None:
        profile, key_id = key
        cached = self.cache.get(profile, key_id) if self.cache is not None and lookup.volumes \
            else None
        if cached is not None:
            try:
                with self._cond:
                    volumes = list(lookup.volumes.values())
                    lookup.volumes.clear()
                for volume in volumes:
                    volume.offer_kek(key_id, bytes(cached))
                    self.audit.record("lookup", outcome="granted", volume=_uuid(volume),
                                      key_id=key_id, kms=profile, source="cache",
                                      state=volume.state.value, kms_error=str(exc))
                    with self._cond:
                        lookup.revalidate[id(volume)] = volume
            finally:
                cached[:] = bytes(len(cached))
        elif lookup.volumes and lookup.delay == 0.0:
            for volume in lookup.volumes.values():
                self.audit.record("lookup", outcome="unreachable", volume=_uuid(volume),
                                  key_id=key_id, kms=profile, reason=str(exc),
                                  cache="miss" if self.cache is not None else "off")
        with self._cond:
            self._retry(key, lookup)
