"""The logical unit: dispatch, unit attentions, state and range checks.

Commands come from one table (:mod:`.registry`), filled by the modules
that implement them; ``execute`` checks, in this order: a pending unit
attention (except for INQUIRY and REQUEST SENSE), an unsupported opcode or
service action (20/00), the CDB length and NACA (24/00); the handler then
validates its fields (24/00), the volume state (NOT READY / DATA PROTECT),
the LBA range (21/00) and the data buffer.

Unit attentions a volume transition posts (there is one queue: TCMU does not
say which I_T nexus sent a command, so every initiator sees each one once):

* 2A/09 CAPACITY DATA HAS CHANGED when the capacity (or block size) changed;
* 3F/03 INQUIRY DATA HAS CHANGED when whether unmapped blocks read back as
  zeroes changed (plain <-> encrypted): VPD B2 and READ CAPACITY(16) LBPRZ;
* 28/00 NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED when the volume
  becomes servable (ENCRYPTED or UNENCRYPTED) from another state: the data
  may now be another volume's (a replica re-synced from elsewhere, a new
  key), so initiators must drop what they cached.  29/00 (power on, reset)
  would also clear reservations and mode settings, which did not change.

Going from servable to locked posts nothing: the next command gets NOT READY
or DATA PROTECT, which says it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from ..backstore import WouldBlock
from ..volume import DataProtectError, LbaOutOfRangeError, NotReadyError, State, Transition
from ..volume import VolumeIOError
from . import inquiry, modes, opcodes, provisioning, readwrite  # noqa: F401 - register commands
from .batch import ReadBatch
from .device import Backend, Identity, Limits
from .locks import RangeLock
from .registry import CONTROL, REGISTRY, command
from .sense import (DATA_PROTECT, GOOD_RESULT, HARDWARE_FAILURE, ILLEGAL_REQUEST, INVALID_OPCODE,
                    LBA_OUT_OF_RANGE, NO_SENSE, NOT_READY, READ_ERROR, UNIT_ATTENTION,
                    WRITE_ERROR, CheckCondition, Result, check, fixed_sense, invalid_field)
from .transfer import Buffer, Transfer, send

__all__ = ["LogicalUnit", "Result"]

log = logging.getLogger(__name__)

#: state -> (sense key, ASC, ASCQ) of media access in that state
STATE_SENSE: dict[State, tuple[int, int, int]] = {
    State.WAITING_FOR_KEY: (NOT_READY, 0x04, 0x01),  # becoming ready
    State.UNKNOWN: (NOT_READY, 0x04, 0x03),  # manual intervention required
    State.NO_KEY: (DATA_PROTECT, 0x74, 0x71),  # logical unit access not authorized
}
_STATE_RESULT = {state: check(*sense) for state, sense in STATE_SENSE.items()}
_SERVING = (State.ENCRYPTED, State.UNENCRYPTED)
_SHORT_CDB = check(ILLEGAL_REQUEST, 0x24, 0x00)
_MAX_UNIT_ATTENTIONS = 16


class LogicalUnit:
    """A SCSI block device (SPC-4/SBC-3) over a backend; ``execute`` is thread-safe."""

    def __init__(self, backend: Backend, identity: Identity | None = None,
                 limits: Limits | None = None) -> None:
        self.backend = backend
        self.identity = identity or Identity()  # may be replaced (LIO sets the serial late)
        self.limits = limits or Limits()
        self.locks = RangeLock()  # every modification of the medium holds its range
        self._ua_lock = threading.Lock()
        self._unit_attentions: deque[tuple[int, int]] = deque()
        self._lbprz = self.lbprz
        backend.add_listener(self._on_transition)

    # -- commands --------------------------------------------------------------

    def execute(self, cdb: bytes, xfer: Transfer, *, nowait: bool | ReadBatch = False) -> Result:
        """Run one command; raises nothing but WouldBlock, and that only when asked
        (an internal error is HARDWARE ERROR 44/00).

        ``nowait``: raise :class:`~gateway.backstore.WouldBlock` rather than wait for
        the medium, having changed nothing; run it again without.  Only READ can
        tell: any other command raises it once its checks pass (a pending unit
        attention or a bad CDB is still answered).  A :class:`ReadBatch` as
        ``nowait`` queues a READ whose checks pass in it, with the reply it will
        have if the batch reads it (see :mod:`.batch`)."""
        try:
            if not cdb:
                return INVALID_OPCODE
            cmd = REGISTRY.lookup(cdb)
            if self._unit_attentions and (cmd is None or cmd.unit_attention):
                pending = self.take_unit_attention()
                if pending is not None:
                    return check(UNIT_ATTENTION, *pending)
            if cmd is None or (cmd.available is not None and not cmd.available(self)):
                return INVALID_OPCODE
            last = cmd.cdb_length - 1
            if len(cdb) <= last:
                return _SHORT_CDB
            if cdb[last] & CONTROL:
                raise invalid_field(last, 2)  # NACA: no normal ACA
            if nowait:
                if not cmd.nowait:
                    raise WouldBlock
                return cmd.handler(self, cdb, xfer, nowait)
            return cmd.handler(self, cdb, xfer)
        except WouldBlock:
            raise
        except CheckCondition as exc:
            return exc.result
        except NotReadyError as exc:  # the state changed since the handler checked it
            return check(NOT_READY, exc.asc, exc.ascq)
        except DataProtectError as exc:
            return check(DATA_PROTECT, exc.asc, exc.ascq)
        except LbaOutOfRangeError:
            return LBA_OUT_OF_RANGE
        except Exception:
            log.exception("internal error running CDB %s", bytes(cdb[:32]).hex())
            return HARDWARE_FAILURE

    # -- unit attentions -----------------------------------------------------

    def post_unit_attention(self, asc: int, ascq: int) -> None:
        """Queue a unit attention for the next command that reports one (once)."""
        with self._ua_lock:
            if (asc, ascq) not in self._unit_attentions:
                if len(self._unit_attentions) == _MAX_UNIT_ATTENTIONS:
                    self._unit_attentions.popleft()
                self._unit_attentions.append((asc, ascq))

    def take_unit_attention(self) -> tuple[int, int] | None:
        """Dequeue the oldest pending unit attention's (ASC, ASCQ)."""
        with self._ua_lock:
            return self._unit_attentions.popleft() if self._unit_attentions else None

    def _on_transition(self, _volume: Any, transition: Transition) -> None:
        if transition.capacity_changed:
            self.post_unit_attention(0x2A, 0x09)
        lbprz = self.lbprz
        if lbprz != self._lbprz:
            self._lbprz = lbprz
            if self.limits.unmap_supported:
                self.post_unit_attention(0x3F, 0x03)
        if transition.new in _SERVING and transition.old != transition.new:
            self.post_unit_attention(0x28, 0x00)

    # -- what handlers use ---------------------------------------------------

    @property
    def lbprz(self) -> bool:
        """Whether unmapped blocks read back as zeroes."""
        return self.backend.header is not None or self.limits.plain_unmap_reads_zeroes

    def state_sense(self) -> tuple[int, int, int] | None:
        """(key, ASC, ASCQ) media access gets in the volume's state, None when servable."""
        return STATE_SENSE.get(self.backend.state)

    def check_ready(self, *, locked_ok: bool = False) -> None:
        """Raise NOT READY or DATA PROTECT unless the volume can serve I/O
        (``locked_ok``: a volume without its key still answers)."""
        state = self.backend.state
        if state is State.ENCRYPTED or state is State.UNENCRYPTED:
            return  # (hashing an Enum member is a Python call: test the usual case first)
        result = _STATE_RESULT.get(state)
        if result is not None and not (locked_ok and state is State.NO_KEY):
            raise CheckCondition(result)

    def check_range(self, lba: int, count: int) -> None:
        """Raise LBA OUT OF RANGE unless ``[lba, lba + count)`` is on the medium."""
        if lba + count > self.backend.num_blocks:
            raise CheckCondition(LBA_OUT_OF_RANGE)

    def read_batch(self) -> ReadBatch:
        """A batch for ``execute(..., nowait=batch)`` (see :mod:`.batch`)."""
        return ReadBatch(self.backend)

    def readinto(self, lba: int, buf: bytearray | memoryview,
                 nowait: bool | ReadBatch = False) -> None:
        if isinstance(nowait, ReadBatch):
            nowait.add(lba, memoryview(buf))
            return
        try:
            self.backend.readinto(lba, buf, nowait=nowait)
        except VolumeIOError as exc:
            log.error("read of LBA %d failed: %s", lba, exc)
            raise CheckCondition(READ_ERROR) from exc

    def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        """Write blocks; durable before this returns when FUA is set, or when the write
        cache is off (WCE=0 promises write-through, so no SYNCHRONIZE CACHE follows)."""
        try:
            self.backend.write(lba, data, fua=fua or not self.limits.write_cache)
        except VolumeIOError as exc:
            log.error("write at LBA %d failed: %s", lba, exc)
            raise CheckCondition(WRITE_ERROR) from exc

    def unmap(self, lba: int, count: int) -> None:
        try:
            self.backend.unmap(lba, count)
        except VolumeIOError as exc:
            log.error("unmap at LBA %d failed: %s", lba, exc)
            raise CheckCondition(WRITE_ERROR) from exc

    def provisioning_status(self, lba: int, count: int) -> tuple[bool, int]:
        try:
            return self.backend.provisioning_status(lba, count)
        except VolumeIOError as exc:
            log.error("provisioning status at LBA %d failed: %s", lba, exc)
            raise CheckCondition(READ_ERROR) from exc

    def flush(self) -> None:
        try:
            self.backend.flush()
        except VolumeIOError as exc:
            log.error("flush failed: %s", exc)
            raise CheckCondition(WRITE_ERROR) from exc


# -- unit-level commands -------------------------------------------------------

@command(0x00, "TEST UNIT READY", 0x00, 0x00, 0x00, 0x00, CONTROL)
def test_unit_ready(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    lu.check_ready()
    return GOOD_RESULT


@command(0x03, "REQUEST SENSE", 0x01, 0x00, 0x00, 0xFF, CONTROL, unit_attention=False)
def request_sense(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    """A pending unit attention (consumed), else the state's sense, else NO SENSE."""
    if cdb[1] & 0x01:
        raise invalid_field(1, 0)  # descriptor-format sense is not supported
    pending = lu.take_unit_attention()
    if pending is not None:
        data = fixed_sense(UNIT_ATTENTION, *pending)
    else:
        data = fixed_sense(*(lu.state_sense() or (NO_SENSE, 0x00, 0x00)))
    return send(xfer, data, cdb[4])


@command(0x1B, "START STOP UNIT", 0x01, 0x00, 0x0F, 0xF7, CONTROL)
def start_stop_unit(lu: LogicalUnit, cdb: bytes, xfer: Transfer) -> Result:
    """Accepted and ignored: the medium is always "spinning"."""
    return GOOD_RESULT
