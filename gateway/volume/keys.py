"""How a volume asks for its KEK: asynchronously, through a key source."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..format import EvluToken

if TYPE_CHECKING:
    from .volume import Volume


class KeySource(Protocol):
    """Looks KEKs up and answers later with :meth:`Volume.offer_kek` or
    :meth:`Volume.refuse_key` (from any thread).  ``request`` must not block."""

    def request(self, volume: Volume, bindings: list[EvluToken]) -> None: ...
