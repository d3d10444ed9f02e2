"""The eVLU: a backing store, its metadata, the state machine and the I/O rules.

I/O is addressed in virtual LBAs of ``block_size`` bytes and only ever
reaches the data segment (the header and keyslots are invisible, and the
capacity is the segment's).  State changes wait for in-flight I/O (a
reader/writer gate), and key requests go out only after the gate is
released, so a key source may answer synchronously.

Unmapped sectors of an encrypted volume: a sector whose *ciphertext* is all
zeroes (never written, unmapped, or a sparse hole) reads back as plaintext
zeroes.  A real ciphertext sector is all-zero with probability 2**-4096.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from .. import crypto
from .. import format as fmt
from ..backstore import Backstore, BackstoreError, WouldBlock
from ..format import keyslot as fmt_keyslot
from .gate import Gate
from .keys import KeySource
from .state import (DataProtectError, LbaOutOfRangeError, NotReadyError, OperationRefusedError,
                    State, Transition, VolumeError, VolumeIOError)

Listener = Callable[["Volume", Transition], None]
_WIPE_CHUNK = 1 << 30
_ENCRYPTED_STATES = (State.WAITING_FOR_KEY, State.ENCRYPTED, State.NO_KEY)

_log = logging.getLogger(__name__)


def wipe_data_area(backstore: Backstore, data_offset: int,
                   progress: Callable[[int], None] | None = None) -> None:
    """Zero everything from ``data_offset`` to the end of the backstore."""
    size = backstore.size
    for offset in range(data_offset, size, _WIPE_CHUNK):
        length = min(_WIPE_CHUNK, size - offset)
        backstore.write_zeroes(offset, length)
        if progress is not None:
            progress(length)
    backstore.flush()


def _decrypt_read(cipher: crypto.SectorCipher, view: memoryview, lba: int, block_size: int) -> None:
    """Decrypt ciphertext just read; all-zero ciphertext sectors (holes) read as zeroes."""
    holes = _holes(view, block_size)
    cipher.decrypt_into(view, lba)
    if holes is not None:
        indices, sectors = holes
        sectors[indices] = 0


def _holes(view: memoryview, block_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, sectors) of the all-zero ciphertext sectors in ``view``, if any."""
    # Only a sector whose first 8 bytes are zero (2**-64 for real ciphertext) can be a
    # hole: one C-speed search over those words usually settles it.
    heads = view.cast("Q")[::block_size // 8].tobytes()
    if bytes(8) not in heads:
        return None
    sectors = np.frombuffer(view, dtype=np.uint64).reshape(-1, block_size // 8)
    maybe = np.flatnonzero(sectors[:, 0] == 0)
    holes = maybe[~sectors[maybe].any(axis=1)]
    return (holes, sectors) if holes.size else None


def read_repaired(backstore: Backstore) -> fmt.Header:
    """Read the header, rewriting a damaged or stale copy from the good one."""
    result = fmt.read(backstore)
    if result.needs_repair:
        _repair(backstore, result)
    return result.header


def _repair(backstore: Backstore, result: fmt.ReadResult) -> None:
    """Rewrite the damaged or stale header copy from the good one, and say so."""
    fmt.repair(backstore, result)
    _log.warning("%s: header copy rewritten from the %s copy (%s)", backstore.path,
                 "primary" if result.primary_ok else "secondary", "; ".join(result.problems))


@contextmanager
def _as_volume_errors() -> Iterator[None]:
    """Report a backing-store failure as a volume I/O error."""
    try:
        yield
    except BackstoreError as exc:
        raise VolumeIOError(str(exc)) from exc


class Volume:
    """An eVLU (or a plain LUN) over one backstore."""

    def __init__(self, backstore: Backstore, *, key_source: KeySource | None = None,
                 allow_plain: bool = False, plain_block_size: int = 512, name: str = "",
                 size_limit: int | None = None) -> None:
        if plain_block_size not in (512, 4096):
            raise ValueError("plain_block_size must be 512 or 4096")
        self.backstore = backstore
        self.name = name or backstore.path
        self.key_source = key_source
        self.allow_plain = allow_plain
        self.plain_block_size = plain_block_size
        self.in_use = False  # set while exported; guards encrypt_on / encrypt_off
        self._gate = Gate()
        self._lock = threading.Lock()  # guards the fields below against key callbacks
        self._listeners: list[Listener] = []
        self._state = State.UNKNOWN
        self._reason = "not scanned yet"
        self._header: fmt.Header | None = None
        self._block_size, self._data_offset = plain_block_size, 0  # follow _header (_set_header)
        self._cipher: crypto.SectorCipher | None = None
        self._dek: bytearray | None = None
        self._unlocked_by: str | None = None  # the key id whose KEK opened the volume
        self._pending: set[str] = set()  # key ids asked for and not answered
        self._refused: dict[str, str] = {}
        self._seen_header = False  # an encrypted LUN never silently turns plain
        self._capacity = 0
        self._size_limit = size_limit  # bytes of the data segment served at most

    # -- introspection ------------------------------------------------------

    @classmethod
    def open(cls, backstore: Backstore, **kwargs: object) -> Volume:
        """Create a volume and read its metadata (repairing a damaged copy
        when the backstore is writable)."""
        vol = cls(backstore, **kwargs)  # type: ignore[arg-type]
        if not backstore.readonly:
            try:
                read_repaired(backstore)
            except (fmt.FormatError, BackstoreError):
                pass  # rescan reports it
        vol.rescan()
        return vol

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str:
        """Why the volume is in its state (for status displays)."""
        return self._reason

    @property
    def header(self) -> fmt.Header | None:
        return self._header

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def data_offset(self) -> int:
        return self._data_offset

    @property
    def num_blocks(self) -> int:
        """Capacity in blocks: the data segment only."""
        return self._capacity

    @property
    def bindings(self) -> list[fmt.EvluToken]:
        hdr = self._header
        return hdr.metadata.evlu_tokens() if hdr else []

    def add_listener(self, listener: Listener) -> None:
        """``listener(volume, transition)`` is called after every state or size change."""
        self._listeners.append(listener)

    def __repr__(self) -> str:
        return f"<Volume {self.name!r} {self._state.value}>"

    # -- state machine ------------------------------------------------------

    def _compute_capacity(self, header: fmt.Header | None) -> int:
        size = self.backstore.refresh_size()
        if header is None:
            avail, block = size, self.plain_block_size
        else:
            seg = header.metadata.data_segment
            avail, block = max(0, size - seg.offset), seg.sector_size
            if seg.size is not None:
                avail = min(avail, seg.size)
        if self._size_limit is not None:
            avail = min(avail, self._size_limit)
        return avail // block

    def limit_size(self, nbytes: int | None) -> Transition | None:
        """Serve at most ``nbytes`` of the data segment (None: all the backing store
        holds), then rescan: the backing store may have grown or shrunk too."""
        with self._lock:
            self._size_limit = nbytes
        return self.rescan()

    def _drop_key(self) -> None:
        if self._cipher is not None:
            self._cipher.close()
        if self._dek is not None:
            self._dek[:] = bytes(len(self._dek))
        self._cipher = self._dek = self._unlocked_by = None

    def _set(self, state: State, reason: str) -> None:
        self._state, self._reason = state, reason

    def _set_header(self, header: fmt.Header | None) -> None:
        """Take ``header`` (None: plain) and the data segment's geometry from it."""
        self._header = header
        if header is None:
            self._block_size, self._data_offset = self.plain_block_size, 0
        else:
            segment = header.metadata.data_segment
            self._block_size, self._data_offset = segment.sector_size, segment.offset

    def _notify(self, transition: Transition | None) -> None:
        if transition is None:
            return
        for listener in list(self._listeners):
            listener(self, transition)

    def _dek_matches(self, header: fmt.Header) -> bool:
        if self._dek is None:
            return False
        try:
            md = header.metadata
            fmt_keyslot.verify(md.digest_for_segment(md.data_segment.id), self._dek)
            return True
        except fmt.FormatError:
            return False

    def rescan(self, *, accept_plain: bool = False) -> Transition | None:
        """Re-read the metadata (repairing a damaged or stale header copy when the
        backstore is writable) and apply the seed's transitions.

        plain -> encrypted (a replica finished syncing): look the key up;
        key changed underneath (re-synced from another source): drop the old
        key and look the new one up; encrypted -> plain: only with
        ``accept_plain``, otherwise UNKNOWN; unreadable header: UNKNOWN.
        Returns the transition, if any.
        """
        with self._gate.exclusive(), self._lock:
            transition, request = self._rescan_locked(accept_plain)
        self._notify(transition)
        self._request(request)
        return transition

    def _rescan_locked(self, accept_plain: bool) -> tuple[Transition | None, list[fmt.EvluToken]]:
        old_state, old_capacity = self._state, self._capacity
        request: list[fmt.EvluToken] = []
        try:
            result = fmt.read(self.backstore)
            header: fmt.Header | None = result.header
            header.metadata.data_segment  # noqa: B018 - raises if unsupported
            if result.needs_repair and not self.backstore.readonly:
                _repair(self.backstore, result)
            capacity = self._compute_capacity(header)
        except fmt.NoHeaderError:
            header = None
            try:
                capacity = self._compute_capacity(None)
            except BackstoreError as exc:
                return self._unknown(f"backing store unreadable: {exc}", old_state), []
        except (fmt.FormatError, BackstoreError) as exc:
            return self._unknown(f"metadata unreadable: {exc}", old_state), []

        if header is None:
            self._set_header(None)
            self._drop_key()
            self._pending.clear()
            if self._seen_header and not accept_plain:
                reason = "LUKS2 header vanished; refusing to serve an encrypted LUN as plain " \
                         "(rescan with accept_plain to serve it unencrypted)"
                self._set(State.UNKNOWN, reason)
            elif self.allow_plain or accept_plain:
                self._seen_header = False
                self.allow_plain = True
                self._set(State.UNENCRYPTED, "encrypted -> plain" if old_state in _ENCRYPTED_STATES
                          else "no LUKS2 header")
            else:
                self._set(State.UNKNOWN, "no LUKS2 header, and this LUN must be encrypted")
        else:
            previous = self._header
            self._set_header(header)
            self._seen_header = True
            same_volume = previous is not None and previous.uuid == header.uuid
            new_ids = {t.key_id for t in header.metadata.evlu_tokens()}
            if self._state == State.ENCRYPTED and same_volume and self._dek_matches(header):
                self._reason = "key verified"
            elif self._state == State.NO_KEY and same_volume and \
                    new_ids <= set(self._refused) and not self._dek_matches(header):
                pass  # same keys already refused: an explicit rescan does not retry them
            else:
                self._drop_key()
                self._refused.clear()
                request = header.metadata.evlu_tokens()
                self._pending = {t.key_id for t in request}
                if old_state == State.UNENCRYPTED:
                    why = "plain -> encrypted: LUKS2 header appeared"
                elif previous is not None and not same_volume:
                    why = "volume re-synced from another source (new UUID): key dropped"
                elif old_state == State.ENCRYPTED:
                    why = "volume key changed underneath: key dropped"
                else:
                    why = "key lookup in flight"
                if not request:
                    self._set(State.NO_KEY, "no evlu-kmip binding in the header")
                else:
                    self._set(State.WAITING_FOR_KEY, why)
        self._capacity = capacity
        return self._transition(old_state, old_capacity), request

    def _unknown(self, reason: str, old_state: State) -> Transition | None:
        self._drop_key()
        self._pending.clear()
        self._set(State.UNKNOWN, reason)
        return self._transition(old_state, self._capacity)

    def _transition(self, old_state: State, old_capacity: int) -> Transition | None:
        resized = old_capacity != self._capacity
        if old_state == self._state and not resized:
            return None
        return Transition(old_state, self._state, self._reason, resized)

    def _request(self, tokens: list[fmt.EvluToken]) -> None:
        if tokens and self.key_source is not None:
            self.key_source.request(self, tokens)

    def offer_kek(self, key_id: str, kek: bytes) -> State:
        """A KEK arrived for ``key_id``: unlock, or NO_KEY if it does not fit."""
        with self._gate.exclusive(), self._lock:
            if self._state != State.WAITING_FOR_KEY or key_id not in self._pending \
                    or self._header is None:
                return self._state
            old = self._state
            self._pending.discard(key_id)
            header = self._header
            for token in header.metadata.evlu_tokens():
                if token.key_id != key_id:
                    continue
                seg = header.metadata.data_segment
                try:
                    dek = fmt.unlock(self.backstore, header, kek, token)
                except (fmt.FormatError, BackstoreError) as exc:
                    self._refused[key_id] = f"key {key_id} does not open the volume: {exc}"
                    continue
                try:
                    cipher = crypto.SectorCipher(dek, seg.sector_size, seg.iv_tweak)
                except crypto.CryptoError as exc:
                    dek[:] = bytes(len(dek))
                    self._refused[key_id] = f"the volume key is unusable: {exc}"
                    continue
                self._dek, self._cipher, self._unlocked_by = dek, cipher, key_id
                self._pending.clear()
                self._set(State.ENCRYPTED, f"unlocked with key {key_id}")
                break
            else:
                self._refused.setdefault(key_id, f"key {key_id} does not open the volume")
                self._settle_refusals()
            transition = self._transition(old, self._capacity)
        self._notify(transition)
        return self._state

    def refuse_key(self, key_id: str, reason: str) -> State:
        """The key source definitively refused ``key_id`` (unauthorized, destroyed...)."""
        with self._gate.exclusive(), self._lock:
            if self._state != State.WAITING_FOR_KEY or key_id not in self._pending:
                return self._state
            old = self._state
            self._pending.discard(key_id)
            self._refused[key_id] = reason
            self._settle_refusals()
            transition = self._transition(old, self._capacity)
        self._notify(transition)
        return self._state

    def withdraw_key(self, key_id: str, reason: str) -> State:
        """The KMS now refuses the key this volume was unlocked with (revoked or
        destroyed while a cached copy served): forget the key, go to NO_KEY."""
        with self._gate.exclusive(), self._lock:
            if self._state != State.ENCRYPTED or self._unlocked_by != key_id:
                return self._state
            old = self._state
            self._drop_key()
            self._refused[key_id] = reason
            self._set(State.NO_KEY, reason)
            transition = self._transition(old, self._capacity)
        self._notify(transition)
        return self._state

    @property
    def unlocked_by(self) -> str | None:
        """The key id whose KEK unlocked the volume (None when locked)."""
        return self._unlocked_by

    def _settle_refusals(self) -> None:
        if not self._pending:
            self._set(State.NO_KEY, "; ".join(self._refused.values()) or "no key")

    # -- I/O ------------------------------------------------------------------

    def _admit(self, lba: int, nblocks: int) -> tuple[crypto.SectorCipher | None, int]:
        """(cipher, byte offset) for I/O to ``[lba, lba + nblocks)``, or the error the
        state or range calls for; the caller holds the gate shared."""
        state = self._state
        if state is State.ENCRYPTED or state is State.UNENCRYPTED:
            if lba < 0 or nblocks < 0 or lba + nblocks > self._capacity:
                raise LbaOutOfRangeError(f"LBA range {lba}+{nblocks} outside 0..{self._capacity}")
            return self._cipher, self._data_offset + lba * self._block_size
        if state == State.WAITING_FOR_KEY:
            raise NotReadyError("key lookup in progress", 0x04, 0x01)
        if state == State.NO_KEY:
            raise DataProtectError(f"no key: {self._reason}")
        raise NotReadyError(f"metadata unusable: {self._reason}", 0x04, 0x03)

    @contextmanager
    def _io(self, lba: int, nblocks: int) -> Iterator[tuple[crypto.SectorCipher | None, int]]:
        with self._gate.shared():
            admitted = self._admit(lba, nblocks)
            with _as_volume_errors():
                yield admitted

    def read(self, lba: int, nblocks: int) -> bytearray:
        """Read ``nblocks`` blocks at ``lba`` (plaintext)."""
        buf = bytearray(nblocks * self._block_size)
        self.readinto(lba, buf)
        return buf

    # readinto and write are the data path of every SCSI READ and WRITE: they hold
    # the gate without a context manager, which costs several microseconds a call.

    def readinto(self, lba: int, buf: bytearray | memoryview, *, nowait: bool = False) -> None:
        """Read ``len(buf) // block_size`` blocks at ``lba`` into ``buf``.

        ``nowait``: raise :class:`~gateway.backstore.WouldBlock` rather than wait for
        the medium (``buf`` is then undefined)."""
        view = memoryview(buf).cast("B")
        nblocks = self._count(len(view))
        gate = self._gate
        if not nowait:
            gate.enter_shared()
        elif not gate.try_enter_shared():  # a state change is under way
            raise WouldBlock
        try:
            cipher, offset = self._admit(lba, nblocks)
            if not nblocks:
                return
            self.backstore.preadinto(view, offset, nowait=nowait)
            if cipher is not None:
                _decrypt_read(cipher, view, lba, self._block_size)
        except BackstoreError as exc:
            raise VolumeIOError(str(exc)) from exc
        finally:
            gate.leave_shared()

    def read_cached(self, requests: Sequence[tuple[int, bytearray | memoryview]]) -> list[bool]:
        """Read each ``(lba, buffer)`` whose data the page cache holds, without waiting
        for the medium, and decrypt them together (:meth:`SectorCipher.decrypt_many`).

        ``result[i]``: whether request ``i`` was read.  One that was not (its data is
        not cached, a state change is under way, or any error) has an undefined
        buffer: :meth:`readinto` reads it and reports the error if there is one."""
        done = [False] * len(requests)
        gate = self._gate
        if not requests or not gate.try_enter_shared():
            return done
        try:
            cipher, read = None, []
            for i, (lba, buf) in enumerate(requests):
                view = memoryview(buf).cast("B")
                try:
                    nblocks = self._count(len(view))
                    cipher, offset = self._admit(lba, nblocks)
                    if nblocks:
                        self.backstore.preadinto(view, offset, nowait=True)
                except (VolumeError, BackstoreError, WouldBlock):
                    continue
                done[i] = True
                if cipher is not None and nblocks:
                    read.append((view, lba))
            if read:
                assert cipher is not None  # one state, one cipher, while the gate is held
                holes = [_holes(view, self._block_size) for view, _ in read]
                cipher.decrypt_many(read)
                for found in holes:
                    if found is not None:
                        indices, sectors = found
                        sectors[indices] = 0
        finally:
            gate.leave_shared()
        return done

    def write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write whole blocks at ``lba``; never writes without a key."""
        nblocks = self._count(memoryview(data).nbytes)
        gate = self._gate
        gate.enter_shared()
        try:
            cipher, offset = self._admit(lba, nblocks)
            if not nblocks:
                return
            if cipher is not None:
                data = bytearray(data)
                cipher.encrypt_into(data, lba)
            self.backstore.pwrite(data, offset)
            if fua:
                self.backstore.flush()
        except BackstoreError as exc:
            raise VolumeIOError(str(exc)) from exc
        finally:
            gate.leave_shared()

    def flush(self) -> None:
        with self._io(0, 0):
            self.backstore.flush()

    def provisioning_status(self, lba: int, nblocks: int) -> tuple[bool, int]:
        """(mapped, n): the first ``n`` blocks (1..``nblocks``) from ``lba`` are all
        mapped, or all deallocated (a hole in the backing file, read as zeroes)."""
        with self._io(lba, nblocks) as (_cipher, offset):
            size = self._block_size
            allocated, length = self.backstore.allocation(offset, nblocks * size)
            if allocated:
                return True, -(-length // size)  # a block partly allocated is mapped
            if length < size:
                return True, 1
            return False, length // size

    def unmap(self, lba: int, nblocks: int) -> None:
        """Deallocate blocks; on an encrypted volume they read back as zeroes."""
        with self._io(lba, nblocks) as (cipher, offset):
            if not nblocks:
                return
            length = nblocks * self.block_size
            if cipher is not None:
                self.backstore.write_zeroes(offset, length)
            else:
                self.backstore.discard(offset, length)

    def _count(self, size: int) -> int:
        """Blocks in ``size`` bytes, which must be whole blocks."""
        block_size = self._block_size
        if size % block_size:
            raise VolumeError(f"buffer of {size} bytes is not a multiple of the "
                              f"{block_size}-byte block size")
        return size // block_size

    # -- administration -------------------------------------------------------

    def _fresh_header(self) -> fmt.Header:
        """Re-read (and repair) the header before changing it."""
        with _as_volume_errors():
            header = read_repaired(self.backstore)
        if self._header is not None and header.uuid != self._header.uuid:
            raise OperationRefusedError("the header changed underneath (different UUID): rescan first")
        return header

    def _check_not_in_use(self, force: bool) -> None:
        if self.in_use and not force:
            raise OperationRefusedError(f"{self.name} is in use (exported); unexport it first "
                                        "or use force")

    def encrypt_on(self, kek: bytes, binding: fmt.Binding, *, sector_size: int = 512,
                   data_offset: int = fmt.DEFAULT_DATA_OFFSET, force: bool = False,
                   wipe: bool = True) -> None:
        """Make this plain volume an eVLU.  Existing data becomes unreadable.

        ``wipe`` zeroes the data area (punch hole / BLKZEROOUT where possible), so
        no old plaintext stays on the medium and the new LUN reads as zeroes."""
        with self._gate.exclusive(), self._lock:
            old = self._state
            if old in _ENCRYPTED_STATES and not force:
                raise OperationRefusedError(f"{self.name} is already encrypted ({old.value}); "
                                            "use force to re-format it and lose its data")
            self._check_not_in_use(force)
            with _as_volume_errors():
                header, dek = fmt.create(self.backstore, kek, binding, sector_size=sector_size,
                                         data_offset=data_offset, force=force)
                if wipe:
                    wipe_data_area(self.backstore, data_offset)
            self._drop_key()
            self._set_header(header)
            self._dek, self._seen_header = dek, True
            self._cipher = crypto.SectorCipher(dek, sector_size)
            self._unlocked_by = binding.key_id
            self._pending.clear()
            self._refused.clear()
            self._set(State.ENCRYPTED, "encryption turned on")
            self._capacity = self._compute_capacity(header)
            transition = self._transition(old, -1)
        self._notify(transition)

    def encrypt_off(self, *, confirm: bool = False, force: bool = False) -> None:
        """Remove all bindings and the header: the data is lost for good."""
        if not confirm:
            raise OperationRefusedError("turning encryption off destroys every key binding and "
                                        "makes the data unreadable: confirm explicitly")
        with self._gate.exclusive(), self._lock:
            old = self._state
            self._check_not_in_use(force)
            header = self._fresh_header()
            with _as_volume_errors():
                fmt.erase(self.backstore, header)
            self._drop_key()
            self._set_header(None)
            self._seen_header, self.allow_plain = False, True
            self._set(State.UNENCRYPTED, "encryption turned off")
            self._capacity = self._compute_capacity(None)
            transition = self._transition(old, -1)
        self._notify(transition)

    def _token_for(self, header: fmt.Header, key_id: str) -> fmt.EvluToken:
        for token in header.metadata.evlu_tokens():
            if token.key_id == key_id:
                return token
        raise OperationRefusedError(f"no binding with key id {key_id!r}")

    def _edit(self, change: Callable[[fmt.Header, bytearray | None], fmt.Header],
              need_key: bool) -> None:
        with self._gate.exclusive(), self._lock:
            if need_key and (self._state != State.ENCRYPTED or self._dek is None):
                raise OperationRefusedError(f"{self.name} is {self._state.value}: the volume must "
                                            "be unlocked (ENCRYPTED) for this")
            if self._state not in _ENCRYPTED_STATES:
                raise OperationRefusedError(f"{self.name} is {self._state.value}: not an eVLU")
            header = self._fresh_header()
            with _as_volume_errors():
                self._set_header(change(header, self._dek))

    def rotate(self, key_id: str, new_kek: bytes, new_binding: fmt.Binding) -> None:
        """Re-wrap the DEK bound to ``key_id`` under a new KEK (no data rewrite)."""
        self._edit(lambda h, dek: fmt.rotate(self.backstore, h, self._token_for(h, key_id).id,
                                             dek, new_kek, new_binding), need_key=True)

    def add_binding(self, kek: bytes, binding: fmt.Binding) -> None:
        """Add a second (third...) binding, e.g. a DR site's KMS key."""
        def change(h: fmt.Header, dek: bytearray | None) -> fmt.Header:
            if any(t.key_id == binding.key_id and t.kms == binding.kms
                   for t in h.metadata.evlu_tokens()):
                raise OperationRefusedError(f"key {binding.key_id!r} is already bound")
            assert dek is not None
            return fmt.add_binding(self.backstore, h, dek, kek, binding)
        self._edit(change, need_key=True)

    def remove_binding(self, key_id: str) -> None:
        """Remove one binding; the last one cannot be removed (use encrypt_off)."""
        def change(h: fmt.Header, _dek: bytearray | None) -> fmt.Header:
            try:
                return fmt.remove_binding(self.backstore, h, self._token_for(h, key_id).id)
            except fmt.FormatError as exc:
                raise OperationRefusedError(str(exc)) from None
        self._edit(change, need_key=False)

    def close(self) -> None:
        """Forget the key and close the backstore."""
        with self._gate.exclusive(), self._lock:
            self._drop_key()
            self._set(State.UNKNOWN, "closed")
        self.backstore.close()
