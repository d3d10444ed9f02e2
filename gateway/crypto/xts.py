"""aes-xts-plain64 over whole sectors, with dm-crypt's semantics.

XTS encrypts the 16-byte block ``j`` of a sector as ``E_k1(P ^ T_j) ^ T_j``
with ``T_j = E_k2(IV) * alpha**j`` in GF(2**128); plain64 makes the IV the
little-endian sector number counted in 512-byte units, plus ``iv_tweak``.

4096-byte sectors, and a few smaller ones, take one libcrypto XTS call each,
on a context that each thread keeps and gives a new IV per sector (:mod:`.evp`:
~1.5-2 us a call).  More take a batched path: one AES call encrypts every IV
under k2, numpy expands the results into the tweaks of their sectors (see the
comment above :class:`_Batch`), and one AES call per chunk does ``E_k1``
between two xors.  That bulk AES runs on a ``cryptography`` XTS context whose
tweak encrypts to zero (:func:`_aes_ecb`): its OpenSSL is over twice as fast in
bulk as the system's here.  The batched path's fixed cost (~45-70 us) is paid
back only from tens to hundreds of KiB; below that, 512-byte sectors from 4.5
KiB take a short numpy route (:func:`_small`, ~12-15 us for 4 KiB).
"""

from __future__ import annotations

import io
import operator
import sys
import threading
from typing import Any, Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .evp import XtsContext, address

__all__ = ["MANY_BYTES", "CryptoError", "SectorCipher"]

if sys.byteorder != "little":  # the tweak arithmetic views blocks as native uint64 pairs
    raise ImportError("gateway.crypto.xts needs a little-endian host")


class CryptoError(ValueError):
    """A bad key, sector size, sector number or buffer length."""


_SECTOR_SIZES = (512, 1024, 2048, 4096)
_KEY_SIZES = (32, 64)
_U64 = np.uint64
# From this many bytes the batched path (~45 us fixed for 512-byte sectors, ~70
# us for larger ones, whose tweak bases need more arithmetic, then ~1.6-2 us per
# 4 KiB) beats one libcrypto call per sector (~1.5 us for 512 bytes, ~1.8 us for
# 4096) and, for 512-byte sectors, the short route; from _SMALL_BYTES, 512-byte
# sectors take the short route (~10 us fixed, ~0.5 us a sector) rather than a
# call each.  4096-byte sectors take a call each at every size: level with the
# batched path for 1 MiB (467 against 483 us), ahead below.  Crossovers measured
# on the build machine (bench/xts.py); a 4 KiB I/O of 512-byte sectors costs the
# same either way here, and takes the calls, which are much the cheaper in the
# TCG appliance guest.
_BATCH_BYTES = {512: 24 * 1024, 1024: 64 * 1024, 2048: 160 * 1024}
_SMALL_BYTES = 9 * 512
# Below this, encrypt()/decrypt() copy the input and work in place: two copies
# cost less than finding a read-only buffer's address (~2.5 us through numpy).
_COPY_BYTES = 64 * 1024
_SHORT_CAPACITY = _BATCH_BYTES[512] // 512  # sectors: the short route's scratch
#: the most bytes SectorCipher.decrypt_many takes in one pass
MANY_BYTES = 256 * 1024
_CHUNK = 256 * 1024  # bytes xored and encrypted per step: keeps the chunk in L2
_SPAN = 1024 * 1024  # bytes whose tweak records are built at once
_CHUNK_VS = _CHUNK // 512  # virtual sectors: 32 blocks, one tweak base each
_SPAN_VS = _SPAN // 512


class SectorCipher:
    """aes-xts-plain64 over whole sectors (dm-crypt semantics).

    Safe to share between threads: each thread gets its own AES contexts, and
    its own numpy scratch (about 1.5 MiB, shared by all ciphers).
    """

    def __init__(
        self,
        key: bytes | bytearray | memoryview,
        sector_size: int = 512,
        iv_tweak: int = 0,
    ) -> None:
        key_view = memoryview(key).cast("B")
        if len(key_view) not in _KEY_SIZES:
            raise CryptoError("key must be 32 bytes (AES-128-XTS) or 64 bytes (AES-256-XTS)")
        half = len(key_view) // 2
        if key_view[:half] == key_view[half:]:
            raise CryptoError("the two halves of an XTS key must differ")
        sector_size, iv_tweak = operator.index(sector_size), operator.index(iv_tweak)
        if sector_size not in _SECTOR_SIZES:
            raise CryptoError(f"sector_size must be one of {_SECTOR_SIZES}")
        if not 0 <= iv_tweak < 1 << 64:
            raise CryptoError("iv_tweak must be in [0, 2**64)")
        self._key: bytearray | None = bytearray(key_view)
        self.sector_size = sector_size
        self._iv_step = sector_size // 512
        self._iv_tweak = iv_tweak
        self._batch_bytes = _BATCH_BYTES.get(sector_size, sys.maxsize)
        # Whether a lone sector takes one libcrypto call (the common 4 KiB I/O).
        self._one_call = sector_size < self._batch_bytes and not self._short(sector_size)
        self._contexts = threading.local()

    def __repr__(self) -> str:
        state = "closed" if self._key is None else f"AES-{len(self._key) * 4}-XTS"
        return (f"<SectorCipher aes-xts-plain64 {state} sector_size={self.sector_size}"
                f" iv_tweak={self._iv_tweak}>")

    def __enter__(self) -> SectorCipher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Zero this object's copy of the key and drop its AES contexts."""
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = None
            self._contexts = threading.local()

    def encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        """Encrypt whole sectors; ``sector`` is the index of the first one."""
        return self._crypt(data, sector, True)

    def decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        """Decrypt whole sectors; ``sector`` is the index of the first one."""
        return self._crypt(data, sector, False)

    def encrypt_into(self, buf: bytearray | memoryview | Any, sector: int) -> None:
        """Encrypt the whole sectors of a writable buffer in place."""
        self._crypt_into(buf, sector, True)

    def decrypt_into(self, buf: bytearray | memoryview | Any, sector: int) -> None:
        """Decrypt the whole sectors of a writable buffer in place."""
        self._crypt_into(buf, sector, False)

    def decrypt_many(self, items: Sequence[tuple[bytearray | memoryview | Any, int]]) -> None:
        """Decrypt several writable buffers in place, each ``(buffer, first sector)``.

        With 512-byte sectors, up to :data:`MANY_BYTES` in all take one short-route
        pass (one set of numpy calls for all, ~0.5 us a sector): cheaper than a
        call per buffer for a batch of small reads."""
        checked = [self._check(buf, sector) for buf, sector in items]
        if any(view.readonly for view, _ in checked):
            raise TypeError("every buffer must be writable")
        sectors = sum(len(view) for view, _ in checked) // self.sector_size
        if self.sector_size != 512 or len(checked) < 2 or sectors * 512 > MANY_BYTES:
            for (view, _), (_, sector) in zip(checked, items):
                self._crypt_into(view, sector, False)
            return
        contexts = self._thread_contexts()
        _small_many(checked, sectors, contexts.tweak, contexts.decrypt)

    # -- dispatch -------------------------------------------------------------

    def _short(self, size: int) -> bool:
        """Whether a buffer of ``size`` bytes takes the short numpy route."""
        return self.sector_size == 512 and _SMALL_BYTES <= size < self._batch_bytes

    def _crypt(self, data: Any, sector: int, encrypt: bool) -> bytes:
        src, iv = self._check(data, sector)
        size = len(src)
        if size < min(self._batch_bytes, _COPY_BYTES):
            out = bytearray(src)
            self._in_place(out, iv, encrypt)
            return bytes(out)
        # The result is written where it will stay: a BytesIO grown to size (one
        # memset) lends its buffer; getvalue() then hands that buffer over as
        # bytes without a copy, and no scratch copy sits between the two.
        result = io.BytesIO()
        result.seek(size - 1)
        result.write(b"\0")
        view = result.getbuffer()
        source = np.frombuffer(src, np.uint8)
        if size < self._batch_bytes:
            self._per_sector(view, iv, encrypt, source.ctypes.data)
        else:
            self._batched(source, np.frombuffer(view, np.uint8), iv, encrypt)
        view.release()  # nothing else holds the buffer: getvalue() need not copy
        return result.getvalue()

    def _crypt_into(self, buf: Any, sector: int, encrypt: bool) -> None:
        view, iv = self._check(buf, sector)
        if view.readonly:
            raise TypeError("buf must be a writable buffer")
        self._in_place(view, iv, encrypt)

    def _in_place(self, view: memoryview | bytearray, iv: int, encrypt: bool) -> None:
        size = len(view)
        if not size:
            return
        if size == self.sector_size and self._one_call:
            # One sector (a 4 KiB I/O): one libcrypto call, with no helper around it.
            contexts = self._thread_contexts()
            (contexts.xts_encrypt if encrypt else contexts.xts_decrypt).crypt(
                address(view), size, iv.to_bytes(16, "little"))
            return
        if self._short(size):
            self._small(view, iv, encrypt)
            return
        if size < self._batch_bytes:
            self._per_sector(view, iv, encrypt)
            return
        array = np.frombuffer(view, np.uint8)
        self._batched(array, array, iv, encrypt)

    def _check(self, data: Any, sector: int) -> tuple[memoryview, int]:
        """The buffer as bytes and the plain64 IV of its first sector."""
        if self._key is None:
            raise CryptoError("SectorCipher is closed")
        view = memoryview(data).cast("B")
        if len(view) % self.sector_size:
            raise CryptoError(f"buffer length {len(view)} is not a multiple of {self.sector_size}")
        sector = operator.index(sector)
        if not 0 <= sector < 1 << 64:
            raise CryptoError("sector must be in [0, 2**64)")
        return view, (sector * self._iv_step + self._iv_tweak) % (1 << 64)

    # -- one libcrypto call per sector --------------------------------------------

    def _per_sector(self, buf: Any, iv: int, encrypt: bool, src: int | None = None) -> None:
        """One XTS call per sector on this thread's context: in place, or from
        the address ``src`` (a buffer of the same length) into ``buf``."""
        contexts = self._thread_contexts()
        (contexts.xts_encrypt if encrypt else contexts.xts_decrypt).crypt_sectors(
            address(buf), len(buf), self.sector_size, iv, self._iv_step, src)

    # -- batched ---------------------------------------------------------------

    def _thread_contexts(self) -> _Contexts:
        contexts = getattr(self._contexts, "value", None)
        if contexts is None:
            contexts = self._contexts.value = _Contexts(self._key)
        return contexts

    def _batched(self, src: np.ndarray, dst: np.ndarray, first_iv: int, encrypt: bool) -> None:
        contexts = self._thread_contexts()
        _batch().run(src, dst, first_iv, self.sector_size, contexts.tweak,
                     contexts.encrypt if encrypt else contexts.decrypt)

    def _small(self, buf: Any, first_iv: int, encrypt: bool) -> None:
        """In place over a few 512-byte sectors (see :func:`_small`)."""
        contexts = self._thread_contexts()
        _small(buf, len(buf) // 512, first_iv, contexts.tweak,
               contexts.encrypt if encrypt else contexts.decrypt)


class _Contexts:
    """One thread's reusable contexts for a key: libcrypto XTS both ways (a call
    per sector), and cryptography AES-ECB under k1 both ways and under k2 (the
    batched path and the short route)."""

    def __init__(self, key: bytearray) -> None:
        view = memoryview(key)
        k1, k2 = view[:len(key) // 2], view[len(key) // 2:]
        self.xts_encrypt = XtsContext(key, encrypt=True)
        self.xts_decrypt = XtsContext(key, encrypt=False)
        self.encrypt = _aes_ecb(k1, encrypt=True)
        self.decrypt = _aes_ecb(k1, encrypt=False)
        self.tweak = _aes_ecb(k2, encrypt=True)


def _aes_ecb(key: memoryview, *, encrypt: bool) -> Callable[[Any, Any], int]:
    """A reusable AES-ECB ``update_into`` under ``key``, on OpenSSL's XTS code path.

    XTS with a second key that encrypts the tweak to zero masks every block
    with zero: that is ECB, but through OpenSSL's vectorised XTS code, about
    twice as fast as its ECB here, and its context serves any number of calls.
    The second key is the complement of ``key``, so the halves always differ.
    """
    pair = bytearray(2 * len(key))
    halves = memoryview(pair)
    try:
        halves[:len(key)] = key
        halves[len(key):] = key
        np.frombuffer(pair, np.uint8)[len(key):] ^= 0xFF
        zero_tweak = Cipher(algorithms.AES(halves[len(key):]), modes.ECB()).decryptor().update(
            bytes(16))
        cipher = Cipher(algorithms.AES(halves), modes.XTS(zero_tweak))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    finally:
        pair[:] = bytes(len(pair))
    return ctx.update_into


# -- tweak expansion ---------------------------------------------------------------
#
# For a tweak base V = (lo, hi) (its little-endian halves) and 0 <= i < 32,
#   V * alpha**i = (lo << i ^ r(hi >> 64-i), hi << i | lo >> 64-i),
#   r(c) = c ^ c << 1 ^ c << 2 ^ c << 7        (x^128 = x^7 + x^2 + x + 1).
# With P = hi ^ hi >> 5 ^ hi >> 6 ^ hi >> 7, P >> 57-i equals r(hi >> 64-i)
# but for its low 7 bits, which are off by E = f(t) = t >> 1 ^ t >> 6 ^ t >> 7,
# t being the top byte of the result (the bits of hi just below the cut).  So,
# but for that fix of its first byte, V * alpha**i is bits 64-i .. 191-i of
#   S = P << 7  |  (lo ^ P >> 57) << 64  |  hi << 128,
# that is, for i = 8a + b, bytes 8-a .. 23-a of S << b: a 16-byte window of a
# "record" S << b (three uint64 words).  _Batch builds records[b, v] for b in
# 0..7 and each virtual sector v (32 blocks, one base V), gathers every window
# of a chunk with one strided copy, then writes each tweak's fixed first byte
# with a strided byte copy.  The first bytes of windows a = 3, 2, 1, 0 are
# record bytes 5..8 and their t are bytes 20..23, so one packed uint32
# computation yields the four fixed bytes of a record.


class _Batch:
    """One thread's scratch for the batched path: records for a span, tweaks for a chunk."""

    def __init__(self) -> None:
        self.iv = np.zeros((_SPAN_VS, 2), _U64)
        self.encrypted_iv = np.empty(_SPAN_VS * 16 + 16, np.uint8)
        self.steps = np.arange(_SPAN_VS, dtype=_U64)
        self.bases = np.empty((2, _SPAN_VS), _U64)
        self.tmp = np.empty((4, _SPAN_VS * 3), _U64)
        self.records = np.empty(8 * _SPAN_VS * 3, _U64)
        self.first_bytes = [np.empty(8 * _SPAN_VS, np.uint32) for _ in range(3)]
        self.tweaks = np.empty(_CHUNK, np.uint8)
        self.tweak_blocks = self.tweaks.view("V16").reshape(_CHUNK_VS, 4, 8)
        self.tweak_first_bytes = self.tweaks.reshape(_CHUNK_VS, 4, 8, 16)[..., 0]
        self.tweak_words = self.tweaks.view(_U64).reshape(_CHUNK_VS, 64)
        self.work = np.empty(_CHUNK + 16, np.uint8)  # the AES output needs 16 bytes of slack
        self.work_words = self.work[:_CHUNK].view(_U64).reshape(_CHUNK_VS, 64)

    def run(self, src: np.ndarray, dst: np.ndarray, first_iv: int, sector_size: int,
            tweak_aes: Callable, aes: Callable) -> None:
        """``dst = aes(src ^ T) ^ T`` with the plain64 tweaks T from ``first_iv`` on."""
        iv_step = sector_size // 512
        src_vs, dst_vs = src.view(_U64).reshape(-1, 64), dst.view(_U64).reshape(-1, 64)
        span = _SPAN // sector_size
        nsectors = len(src) // sector_size
        for start in range(0, nsectors, span):
            count = min(span, nsectors - start)
            windows, first_bytes = self._records(
                tweak_aes, (first_iv + start * iv_step) % (1 << 64), count, iv_step)
            base = start * iv_step
            for v0 in range(0, count * iv_step, _CHUNK_VS):
                v1 = min(v0 + _CHUNK_VS, count * iv_step)
                tweaks, work = self.tweak_words[:v1 - v0], self.work_words[:v1 - v0]
                np.copyto(self.tweak_blocks[:v1 - v0], windows[v0:v1])
                np.copyto(self.tweak_first_bytes[:v1 - v0], first_bytes[v0:v1])
                np.bitwise_xor(src_vs[base + v0:base + v1], tweaks, out=work)
                aes(self.work[:(v1 - v0) * 512], self.work[:(v1 - v0) * 512 + 16])
                np.bitwise_xor(work, tweaks, out=dst_vs[base + v0:base + v1])

    def _records(self, tweak_aes: Callable, first_iv: int, count: int,
                 iv_step: int) -> tuple[np.ndarray, np.ndarray]:
        """Views ``[v, a, b]`` of the windows and fixed first bytes of ``count`` sectors."""
        iv = self.iv[:count]
        np.multiply(self.steps[:count], _U64(iv_step), out=iv[:, 0])
        iv[:, 0] += _U64(first_iv)
        tweak_aes(iv.reshape(-1).view(np.uint8), self.encrypted_iv[:count * 16 + 16])
        sector_bases = self.encrypted_iv[:count * 16].view(_U64).reshape(count, 2)
        nvs = count * iv_step
        bases = self.bases[:, :nvs]
        if iv_step == 1:
            np.copyto(bases, sector_bases.T)
        else:
            _group_bases(sector_bases, bases.reshape(2, count, iv_step), self.tmp)
        records = self.records[:8 * nvs * 3].reshape(8, nvs, 3)
        _expand(bases[0], bases[1], records, self.tmp)
        fixed = [buf[:8 * nvs].reshape(8, nvs) for buf in self.first_bytes]
        _fix_first_bytes(records, fixed)
        windows = np.ndarray((nvs, 4, 8), "V16", records, 8, (24, -1, 24 * nvs))
        return windows, np.ndarray((nvs, 4, 8), np.uint8, fixed[0], 3, (4, -1, 4 * nvs))


_THREAD = threading.local()

# The short route, for a few 512-byte sectors of 32 blocks each: with the sector's
# tweak base V = (lo, hi), block b's tweak V * alpha**b (b < 32, see above) is
#   (lo << b ^ r(hi >> 64-b), hi << b ^ lo >> 64-b),
# the xor of five terms in the low half and two in the high half (whose other three
# terms stay zero in the scratch), built by three broadcast shifts and summed by one
# reduction (numpy shifts by 64 give 0: that covers b = 0).  Its fixed cost is
# numpy's per-call overhead, so each thread keeps the views for each sector count
# it has seen.
_B = np.arange(32, dtype=_U64)
_CUT = _U64(64) - _B
_R_SHIFTS = np.array([1, 2, 7], _U64).reshape(3, 1, 1)


class _Short:
    """Views, over one thread's scratch, for the short route over ``n`` sectors."""

    def __init__(self, arrays: tuple[np.ndarray, ...], n: int) -> None:
        iv, encrypted_iv, terms, tweaks, work = arrays
        self.iv_low = iv[:n, 0]
        self.iv_bytes = iv[:n].reshape(-1).view(np.uint8)
        self.steps = np.arange(n, dtype=_U64)
        self.encrypted_iv = encrypted_iv[:n * 16 + 16]  # the AES output needs 16 bytes of slack
        base = encrypted_iv[:n * 16].view(_U64).reshape(n, 2, 1)  # (lo, hi) of each sector
        self.base, self.swapped = base, base[:, ::-1]
        self.terms = terms[:, :n]  # rows: V << b, the cuts, the cut of hi << 1, 2, 7
        self.shifted, self.cuts = self.terms[0], self.terms[1]
        self.cut_hi, self.r_terms = self.terms[1, :, 0], self.terms[2:, :, 0]  # low halves only
        self.tweaks = tweaks[:n]
        self.tweak_halves = self.tweaks.transpose(0, 2, 1)
        self.work, self.work_in = work[:n * 512 + 16], work[:n * 512]
        self.work_blocks = self.work_in.view(_U64).reshape(n, 32, 2)


def _short_views(n: int) -> _Short:
    """This thread's views for ``n`` sectors (scratch of ~170 KiB for the usual sizes)."""
    shorts: dict[int, _Short] | None = getattr(_THREAD, "shorts", None)
    if shorts is None or n not in shorts:
        capacity = max(n, _SHORT_CAPACITY)
        arrays = getattr(_THREAD, "short_arrays", None)
        if arrays is None or len(arrays[0]) < capacity:
            arrays = _THREAD.short_arrays = (
                np.zeros((capacity, 2), _U64), np.empty(capacity * 16 + 16, np.uint8),
                np.zeros((5, capacity, 2, 32), _U64), np.empty((capacity, 32, 2), _U64),
                np.empty(capacity * 512 + 16, np.uint8))
            shorts = _THREAD.shorts = {}
        shorts[n] = _Short(arrays, n)
    return shorts[n]


def _short_tweaks(short: _Short, tweak_aes: Callable) -> None:
    """``short.tweaks`` from the IVs in ``short.iv_low`` (see above)."""
    tweak_aes(short.iv_bytes, short.encrypted_iv)
    np.right_shift(short.swapped, _CUT, out=short.cuts)  # hi >> 64-b, lo >> 64-b
    np.left_shift(short.cut_hi, _R_SHIFTS, out=short.r_terms)
    np.left_shift(short.base, _B, out=short.shifted)  # lo << b, hi << b
    np.bitwise_xor.reduce(short.terms, axis=0, out=short.tweak_halves)


def _small(buf: Any, n: int, first_iv: int, tweak_aes: Callable, aes: Callable) -> None:
    """``buf = aes(buf ^ T) ^ T`` in place over ``n`` 512-byte sectors from ``first_iv``."""
    short = _short_views(n)
    np.add(short.steps, _U64(first_iv), out=short.iv_low)  # wraps at 2**64, as plain64
    _short_tweaks(short, tweak_aes)
    blocks = np.frombuffer(buf, _U64).reshape(n, 32, 2)
    np.bitwise_xor(blocks, short.tweaks, out=short.work_blocks)
    aes(short.work_in, short.work)
    np.bitwise_xor(short.work_blocks, short.tweaks, out=blocks)


def _small_many(checked: list[tuple[memoryview, int]], n: int, tweak_aes: Callable,
                aes: Callable) -> None:
    """As :func:`_small` over buffers ``(view, first IV)`` of ``n`` sectors in all,
    gathered into the scratch and scattered back."""
    short = _short_views(n)
    work, start = memoryview(short.work_in), 0
    for view, _ in checked:
        work[start:start + len(view)] = view
        start += len(view)
    firsts = np.array([first_iv for _, first_iv in checked], _U64)
    counts = [len(view) // 512 for view, _ in checked]
    if min(counts) == max(counts):  # the usual batch: READs of one size
        np.add(firsts[:, None], short.steps[:counts[0]],
               out=short.iv_low.reshape(len(counts), counts[0]))
    else:  # each buffer's first IV, plus its sectors' places in it
        np.add(np.repeat(firsts - np.cumsum([0] + counts[:-1], dtype=_U64), counts),
               short.steps, out=short.iv_low)  # all modulo 2**64
    _short_tweaks(short, tweak_aes)
    np.bitwise_xor(short.work_blocks, short.tweaks, out=short.work_blocks)
    aes(short.work_in, short.work)
    np.bitwise_xor(short.work_blocks, short.tweaks, out=short.work_blocks)
    start = 0
    for view, _ in checked:
        end = start + len(view)
        view[:] = work[start:end]
        start = end


def _batch() -> _Batch:
    batch = getattr(_THREAD, "batch", None)
    if batch is None:
        batch = _THREAD.batch = _Batch()
    return batch


def _group_bases(sector_bases: np.ndarray, bases: np.ndarray, tmp: np.ndarray) -> None:
    """``bases[:, s, m] = sector_bases[s] * alpha**(32 m)``: the (lo, hi) of the
    32-block groups of 1024- or 2048-byte sectors (m < 4).

    In 32-bit limbs, multiplying by alpha**32 moves every limb up one place, and
    a limb c that reaches place 4 + j (x**128 = x**7 + x**2 + x + 1) comes back
    at place j as M1(c) = c ^ c << 1 ^ c << 2 ^ c << 7.  Keeping those values
    whole (39 bits) in uint64 lanes, limb p of the group m base is lane 3 - p + m
    of one sequence z = (v3 .. v0, M1(v3 .. v0)) over the limbs v of the sector's
    base.  A lane's bits beyond 32 belong to the next limb; limb 3 is a plain
    limb in groups 0 to 3, so nothing wraps round to limb 0.
    """
    count, groups = bases.shape[1:]
    work = tmp.reshape(-1)[:(12 + 2 * groups) * count]  # <= 20 * 1024 words: fits in tmp
    z, t = work[:8 * count].reshape(8, count), work[8 * count:12 * count].reshape(4, count)
    lanes, m1 = z[:4], z[4:]
    out = work[12 * count:].reshape(2, groups, count)  # group-major, so numpy runs over long rows
    np.copyto(lanes, sector_bases.view(np.uint32).T[::-1])
    np.left_shift(lanes, _U64(1), out=m1)
    m1 ^= lanes
    for shift in (2, 7):
        m1 ^= np.left_shift(lanes, _U64(shift), out=t)
    lo, hi = out

    def limb(p: int) -> np.ndarray:  # limb p of every group's base
        return z[3 - p:3 - p + groups]

    np.left_shift(limb(1), _U64(32), out=lo)
    lo ^= limb(0)
    np.right_shift(limb(1), _U64(32), out=hi)
    hi ^= limb(2)
    np.left_shift(limb(3), _U64(32), out=t[:groups])
    hi ^= t[:groups]
    np.copyto(bases, out.transpose(0, 2, 1))


def _expand(lo: np.ndarray, hi: np.ndarray, records: np.ndarray, tmp: np.ndarray) -> None:
    """Build ``records[b, v] = S_v << b`` (see above) from the bases ``(lo[v], hi[v])``."""
    p, carry, s = tmp[0, :len(lo)], tmp[1, :len(lo)], records[0]
    np.right_shift(hi, _U64(5), out=p)
    p ^= hi
    for shift in (6, 7):
        np.right_shift(hi, _U64(shift), out=carry)
        p ^= carry
    np.right_shift(p, _U64(57), out=s[:, 1])
    s[:, 1] ^= lo
    np.left_shift(p, _U64(7), out=s[:, 0])
    np.copyto(s[:, 2], hi)
    # Double the rows: S << (b + k) = (S << b) << k, each word taking the top k
    # bits of the word below.  Word 0 takes them from the previous record's word
    # 2: that garbage stays in bits 0..6 of word 0, below every window.
    flat = records.reshape(8, -1)
    for k in (1, 2, 4):
        src, dst = flat[:k].reshape(-1), flat[k:2 * k].reshape(-1)
        carry = tmp.reshape(-1)[:src.size - 1]
        np.left_shift(src, _U64(k), out=dst)
        np.right_shift(src[:-1], _U64(64 - k), out=carry)
        dst[1:] |= carry


def _fix_first_bytes(records: np.ndarray, out: list[np.ndarray]) -> None:
    """Byte ``3 - a`` of ``out[0][b, v]``: the fixed first byte of window ``a`` of a record."""
    fixed, top, part = out

    def load(offset: int, dst: np.ndarray) -> np.ndarray:  # record bytes offset .. offset+3
        np.copyto(dst, np.ndarray(records.shape[:2], np.uint32, records, offset,
                                  records.strides[:2]))
        return dst.reshape(-1).view(_U64)  # two records per word for the arithmetic

    t, f, p = load(20, top), fixed.reshape(-1).view(_U64), part.reshape(-1).view(_U64)
    np.right_shift(t, _U64(1), out=f)
    f &= _U64(0x7F7F7F7F_7F7F7F7F)
    for shift, mask in ((6, 0x03030303_03030303), (7, 0x01010101_01010101)):
        np.right_shift(t, _U64(shift), out=p)
        p &= _U64(mask)
        f ^= p
    f ^= load(5, part)
