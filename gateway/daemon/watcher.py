"""The header watcher: a cheap periodic look at each LUN's LUKS2 binary headers.

Every ``interval`` seconds it reads the 4096-byte binary header of each
copy (the primary at 0, the secondary at the primary's ``hdr_size``, or at
16 KiB when there is no primary) and the store's size, and keeps magic,
seqid and checksum.  When that fingerprint changes (a replica re-synced from
another source, a key id changed, a header appeared after a sync, the store
grew), the volume is rescanned, and the SCSI layer raises the matching unit
attention from the volume's transition.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

from ..backstore import Backstore, BackstoreError
from ..format import FormatError, binary
from ..volume import Transition
from .luns import Lun

_log = logging.getLogger(__name__)
Fingerprint = tuple[int, bytes, bytes]
_COPY = struct.Struct(">6s2x8x8s")  # magic, (version, hdr_size), seqid
_CSUM = slice(448, 480)


def fingerprint(store: Backstore) -> Fingerprint:
    """(size, primary, secondary): magic + seqid + checksum of each binary header."""
    size = store.refresh_size()
    primary = store.pread(binary.BINARY_SIZE, 0) if size >= binary.BINARY_SIZE else b""
    offset = binary.HDR_SIZES[0]
    if binary.has_magic(primary):
        try:
            offset = binary.peek_hdr_size(primary)
        except FormatError:
            pass  # a damaged primary: look at the first secondary offset
    secondary = store.pread(binary.BINARY_SIZE, offset) \
        if size >= offset + binary.BINARY_SIZE else b""
    return size, _essence(primary), _essence(secondary)


def _essence(raw: bytes) -> bytes:
    if not binary.has_magic(raw):
        return b""
    magic, seqid = _COPY.unpack_from(raw)
    return magic + seqid + raw[_CSUM]


class HeaderWatcher:
    """Rescans a LUN whose header fingerprint changed; ``tick`` does one round."""

    def __init__(self, luns: Callable[[], list[Lun]], interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.luns = luns
        self.interval = interval
        self.clock = clock
        self._seen: dict[str, Fingerprint] = {}
        self._next = 0.0
        self.rounds = 0

    def due(self) -> bool:
        return self.clock() >= self._next

    def tick(self) -> list[tuple[Lun, Transition | None]]:
        """Check every LUN now; the LUNs rescanned and their transitions."""
        self._next = self.clock() + self.interval
        self.rounds += 1
        changed = []
        luns = self.luns()
        for lun in luns:
            try:
                now = fingerprint(lun.volume.backstore)
            except (BackstoreError, OSError, ValueError) as exc:
                _log.warning("%s: header check failed: %s", lun.name, exc)
                continue
            before = self._seen.get(lun.path)
            self._seen[lun.path] = now
            if before is None or before == now:
                continue
            transition = lun.volume.rescan()
            _log.info("%s: header changed underneath (seqid/checksum/size): %s", lun.name,
                      transition or "no state change", extra={"lun": lun.name})
            changed.append((lun, transition))
        for gone in set(self._seen) - {lun.path for lun in luns}:
            del self._seen[gone]
        return changed
