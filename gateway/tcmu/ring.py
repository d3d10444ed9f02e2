"""The target_core_user command ring, sans-IO: parse entries, write completions.

Layout (``include/uapi/linux/target_core_user.h``, native byte order): a
128-byte mailbox at offset 0 (version u16 @0, flags u16 @2, cmdr_off u32 @4,
cmdr_size u32 @8, cmd_head u32 @12 written by the kernel, cmd_tail u32 @64
written by us), the command ring at ``cmdr_off``, the data area after it.

Each entry starts with ``len_op`` (u32: length | op), ``cmd_id`` (u16),
``kflags`` and ``uflags`` (u8).  A CMD request holds iov_cnt @8, cdb_off @24
(from the start of the mapping) and 16-byte iovecs (offset, length) from @48;
its response reuses the slot: scsi_status @8, read_len @12, sense[96] @16 (read
only with CHECK CONDITION).
The kernel pads to the ring's end rather than wrap an entry, and reads
completions from its last position to ``cmd_tail``, skipping PAD and TMR
entries and looking each CMD slot's ``cmd_id`` up.  With out-of-order
completion (mailbox flag 0x1) a command is completed by writing its id and
response into whatever CMD slot is at the tail.

Everything a command needs (CDB, iovecs) is copied out at fetch time: a later
completion may overwrite its slot.  Nothing outside the mapping, the ring or
the data area is ever read or written, whatever the entries say.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable
from typing import NamedTuple

MAILBOX_SIZE = 128
VERSION = 2
FLAG_OOOC = 0x1  # out-of-order completion
FLAG_READ_LEN = 0x2
FLAG_TMR = 0x4
OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP, UFLAG_READ_LEN = 0x1, 0x2
ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry)
HDR_SIZE = 8
IOV_OFFSET = 48
IOV_SIZE = 16
SENSE_SIZE = 96
MAX_CDB = 260  # SCSI allows up to 260-byte variable-length CDBs
_ALIGN = 8

if sys.byteorder != "little":  # pragma: no cover - the appliance is x86-64/arm64
    raise ImportError("gateway.tcmu.ring assumes a little-endian host (the kernel's byte order)")

_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_MAILBOX = struct.Struct("<HHII")  # version, flags, cmdr_off, cmdr_size
# cmd_head and cmd_tail as uint32 items of the mailbox: a memoryview item is loaded
# and stored whole (memcpy of 4 aligned bytes), where struct's "<I" goes byte by
# byte and the other side could see a torn value.
_HEAD_WORD, _TAIL_WORD = 12 // 4, 64 // 4
_IOV = struct.Struct("<QQ")
_REQ = struct.Struct("<III4xQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, pad, cdb_off
_RSP = struct.Struct("<BxxxI")  # scsi_status, pads, read_len
_HDR = struct.Struct("<IH")  # len_op, cmd_id
CHECK_CONDITION = 0x02


class RingError(Exception):
    """The ring is inconsistent (a malformed entry): the device must be reset."""


class Iovec(NamedTuple):
    """A piece of a command's data buffer: ``length`` bytes at ``offset`` in the mapping."""

    offset: int
    length: int


class Command(NamedTuple):
    """A SCSI command taken off the ring (copied out: its slot may be reused)."""

    cmd_id: int
    cdb: bytes
    iovecs: tuple[Iovec, ...]
    problem: str = ""  # set when the entry was unusable: complete it with an error

    @property
    def length(self) -> int:
        return sum(v.length for v in self.iovecs)


class TaskManagement(NamedTuple):
    """A TMR entry (only with ``tmr_notification``): the kernel aborted or reset commands."""

    tmr_type: int
    cmd_ids: tuple[int, ...]


_COMMAND_SIZE = (6, 10, 10, 12, 16, 12, 10, 10)  # the kernel's scsi_command_size_tbl


def scsi_cdb_length(cdb_head: bytes | memoryview) -> int:
    """The CDB length the kernel copies (``scsi_command_size``): by group code, or
    8 + ADDITIONAL CDB LENGTH for a variable-length (0x7F) CDB."""
    if cdb_head[0] == 0x7F and len(cdb_head) > 7:
        return 8 + cdb_head[7]
    return _COMMAND_SIZE[cdb_head[0] >> 5]


class Ring:
    """One device's mailbox, command ring and data area, over a writable buffer."""

    def __init__(self, mem: memoryview | bytearray) -> None:
        view = memoryview(mem).cast("B")
        if len(view) < MAILBOX_SIZE:
            raise RingError(f"mapping of {len(view)} bytes is smaller than the mailbox")
        version, flags, cmdr_off, cmdr_size = _MAILBOX.unpack_from(view, 0)
        if version != VERSION:
            raise RingError(f"TCMU mailbox version {version}, expected {VERSION}")
        if cmdr_off < MAILBOX_SIZE or cmdr_size < ENTRY_SIZE or cmdr_size % _ALIGN \
                or cmdr_off + cmdr_size > len(view):
            raise RingError(f"ring at {cmdr_off}+{cmdr_size} does not fit a {len(view)}-byte "
                            "mapping")
        self.mem = view
        self._words = view[:MAILBOX_SIZE].cast("I")
        self.flags = flags
        self.cmdr_off, self.cmdr_size = cmdr_off, cmdr_size
        self.data_start, self.data_end = cmdr_off + cmdr_size, len(view)
        self.ring = view[cmdr_off:cmdr_off + cmdr_size]
        self.cursor = self.tail  # entries before it have been fetched
        self._check_offset(self.cursor, "cmd_tail")

    def close(self) -> None:
        """Release the views of the mapping (it cannot be unmapped while they exist)."""
        for view in (self.ring, self._words, self.mem):
            view.release()

    @property
    def out_of_order(self) -> bool:
        return bool(self.flags & FLAG_OOOC)

    @property
    def read_len_supported(self) -> bool:
        return bool(self.flags & FLAG_READ_LEN)

    @property
    def head(self) -> int:
        return int(self._words[_HEAD_WORD])

    @property
    def tail(self) -> int:
        return int(self._words[_TAIL_WORD])

    def _set_tail(self, value: int) -> None:
        self._words[_TAIL_WORD] = value

    def _check_offset(self, offset: int, what: str) -> None:
        if offset >= self.cmdr_size or offset % _ALIGN:
            raise RingError(f"{what} {offset} is not an entry offset in a {self.cmdr_size}-byte "
                            "ring")

    def _entry(self, offset: int) -> tuple[int, int]:
        """(op, length) of the entry at ``offset``, checked to lie within the ring."""
        if offset + HDR_SIZE > self.cmdr_size:
            raise RingError(f"entry header at {offset} crosses the end of the ring")
        len_op = _U32.unpack_from(self.ring, offset)[0]
        op, length = len_op & 7, len_op & ~7
        if length < HDR_SIZE or offset + length > self.cmdr_size:
            raise RingError(f"entry at {offset} has bad length {length} (op {op})")
        return op, length

    # -- fetch ----------------------------------------------------------------

    def fetch(self) -> list[Command | TaskManagement]:
        """Take every entry between our cursor and the kernel's head."""
        head = self.head
        self._check_offset(head, "cmd_head")
        out: list[Command | TaskManagement] = []
        ring, size, cursor = self.ring, self.cmdr_size, self.cursor
        while cursor != head:
            if cursor + HDR_SIZE > size:
                raise RingError(f"entry header at {cursor} crosses the end of the ring")
            len_op, cmd_id = _HDR.unpack_from(ring, cursor)
            op, length = len_op & 7, len_op & ~7
            if length < HDR_SIZE or cursor + length > size:
                raise RingError(f"entry at {cursor} has bad length {length} (op {op})")
            if op == OP_CMD:
                out.append(self._command(cursor, length, cmd_id))
            elif op == OP_TMR:
                out.append(self._tmr(cursor, length))
            elif op != OP_PAD:
                ring[cursor + 7] |= UFLAG_UNKNOWN_OP
            cursor = (cursor + length) % size
            self.cursor = cursor
        return out

    def _command(self, offset: int, length: int, cmd_id: int) -> Command:
        if length < ENTRY_SIZE:
            raise RingError(f"CMD entry at {offset} shorter than {ENTRY_SIZE} bytes")
        iov_cnt, bidi_cnt, dif_cnt, cdb_off = _REQ.unpack_from(self.ring, offset + HDR_SIZE)
        count = iov_cnt + bidi_cnt + dif_cnt
        if IOV_OFFSET + IOV_SIZE * count > length:
            raise RingError(f"CMD entry at {offset}: {count} iovecs do not fit {length} bytes")
        problems = []
        iovecs = []
        ring, data_start, data_end = self.ring, self.data_start, self.data_end
        for i in range(iov_cnt):  # bidi and DIF iovecs follow; we use neither
            base, iov_len = _IOV.unpack_from(ring, offset + IOV_OFFSET + IOV_SIZE * i)
            if not (data_start <= base and base + iov_len <= data_end):
                problems.append(f"iovec {i} ({base}+{iov_len}) outside the data area")
            elif iov_len:
                iovecs.append(Iovec(base, iov_len))
        cdb = b""
        ring_lo, ring_hi = self.cmdr_off, self.cmdr_off + self.cmdr_size
        if not ring_lo <= cdb_off < ring_hi:
            problems.append(f"CDB offset {cdb_off} outside the ring")
        else:
            opcode = self.mem[cdb_off]
            if opcode == 0x7F:  # variable length: its length byte may lie beyond the ring
                cdb_len = min(scsi_cdb_length(self.mem[cdb_off:min(cdb_off + 8, ring_hi)]),
                              MAX_CDB)
            else:
                cdb_len = _COMMAND_SIZE[opcode >> 5]
            cdb = self.mem[cdb_off:min(cdb_off + cdb_len, ring_hi)].tobytes()
        if bidi_cnt or dif_cnt:
            problems.append("bidirectional or DIF iovecs are not supported")
        if problems:
            return Command(cmd_id, cdb, (), "; ".join(problems))
        return Command(cmd_id, cdb, tuple(iovecs))

    def _tmr(self, offset: int, length: int) -> TaskManagement:
        tmr_type, cmd_cnt = _U32.unpack_from(self.ring, offset + 8)[0], \
            _U32.unpack_from(self.ring, offset + 12)[0]
        cmd_cnt = min(cmd_cnt, max(0, (length - 32) // 2))
        ids = tuple(_U16.unpack_from(self.ring, offset + 32 + 2 * i)[0] for i in range(cmd_cnt))
        return TaskManagement(tmr_type, ids)

    # -- complete -------------------------------------------------------------

    def complete(self, cmd_id: int, status: int, sense: bytes = b"",
                 read_len: int | None = None) -> None:
        """Write one completion into the CMD slot at the tail and advance the tail."""
        self.complete_all(((cmd_id, status, sense, read_len),))

    def complete_all(self, replies: Iterable[tuple[int, int, bytes, int | None]]) -> None:
        """Write completions ``(cmd_id, status, sense, read_len)`` into the CMD slots
        from the tail on, then advance the tail once past them all."""
        ring, size, cursor = self.ring, self.cmdr_size, self.cursor
        read_len_ok = self.read_len_supported
        tail = done = self.tail
        try:
            for cmd_id, status, sense, read_len in replies:
                while True:
                    if tail == cursor:  # checked at every step: never write an unfetched entry
                        raise RingError("completion with no fetched command slot left at the tail")
                    op, length = self._entry(tail)
                    if op == OP_CMD:
                        break
                    tail = (tail + length) % size  # the kernel skips PAD and TMR
                _U16.pack_into(ring, tail + 4, cmd_id)
                uflags = ring[tail + 7] & ~(UFLAG_READ_LEN | UFLAG_UNKNOWN_OP)
                length_out = 0
                if read_len is not None and read_len_ok:
                    uflags |= UFLAG_READ_LEN
                    length_out = read_len
                ring[tail + 7] = uflags
                _RSP.pack_into(ring, tail + HDR_SIZE, status & 0xFF, length_out)
                if status == CHECK_CONDITION:  # the only status whose sense the kernel reads
                    sense = bytes(sense[:SENSE_SIZE])
                    ring[tail + 16:tail + 16 + SENSE_SIZE] = sense + bytes(SENSE_SIZE - len(sense))
                tail = done = (tail + length) % size
        finally:  # what was written before an error is complete
            self._set_tail(done)

    def skip_to_cursor(self) -> None:
        """Advance the tail over PAD/TMR entries that precede no pending command."""
        tail = self.tail
        while tail != self.cursor:
            op, length = self._entry(tail)
            if op == OP_CMD:
                break
            tail = (tail + length) % self.cmdr_size
        self._set_tail(tail)
