"""Key sources for tests that need no KMS: they answer from inside ``request``."""

from __future__ import annotations

from gateway import format as fmt
from gateway.volume import Volume


class SyncSource:
    """Unlocks with the KEKs it knows; refuses the others, or (``refuse_unknown=False``)
    never answers for them, leaving the volume WAITING_FOR_KEY."""

    def __init__(self, keys: dict[str, bytes], *, refuse_unknown: bool = True) -> None:
        self.keys = keys
        self.refuse_unknown = refuse_unknown

    def request(self, volume: Volume, bindings: list[fmt.EvluToken]) -> None:
        for b in bindings:
            if b.key_id in self.keys:
                volume.offer_kek(b.key_id, self.keys[b.key_id])
            elif self.refuse_unknown:
                volume.refuse_key(b.key_id, f"KMS refused {b.key_id}")
