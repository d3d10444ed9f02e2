"""READs of one fetch, read from the page cache and decrypted together.

``LogicalUnit.execute(cdb, xfer, nowait=batch)`` runs a READ's checks and,
instead of reading, queues ``(lba, buffer)`` in the batch and returns the
reply it will have; :meth:`ReadBatch.run` then reads every queued READ that
the page cache holds and decrypts them in one pass (4 KiB of 512-byte sectors
takes ~13 us to decrypt alone, ~7-9 us in a batch of 16-32, and far fewer
numpy calls: under emulation, as in the appliance's TCG guest, calls are what
cost).  A READ that ``run`` could not do must be executed again without the
batch, which reads it from the medium or reports its error.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class CachedReader(Protocol):
    """What :meth:`gateway.volume.Volume.read_cached` offers."""

    def read_cached(self, requests: Sequence[tuple[int, memoryview]]) -> list[bool]: ...


class ReadBatch:
    """Queued READs of one logical unit; truthy, so it also means ``nowait``."""

    def __init__(self, reader: CachedReader) -> None:
        self.reader = reader
        self.requests: list[tuple[int, memoryview]] = []

    def __len__(self) -> int:
        return len(self.requests)

    def __bool__(self) -> bool:
        return True

    def add(self, lba: int, view: memoryview) -> None:
        self.requests.append((lba, view))

    def run(self) -> list[bool]:
        """Read what is queued; ``result[i]``: whether request ``i`` was read. Empties
        the batch."""
        requests, self.requests = self.requests, []
        return self.reader.read_cached(requests) if requests else []
