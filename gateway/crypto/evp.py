"""AES-XTS contexts of the system's libcrypto (OpenSSL 3), called through ctypes.

``cryptography`` builds a new cipher context, and so both AES key schedules,
for every tweak: it refuses ``reset_nonce`` for XTS.  That costs ~6 us a call
on the build machine and ~0.5 ms in the TCG appliance guest, where a 4 KiB
sector's own AES is ~45 us.  libcrypto's ``EVP_CipherInit_ex`` can give a live
XTS context a new IV and nothing else, so one context per key, direction and
thread serves every sector: ~2 us natively, ~60 us in the guest, for 4 KiB.

libcrypto.so.3 is the library Python's own ``ssl`` and ``hashlib`` link, so it
is present wherever this package runs.  The callers hand raw addresses of
buffers they hold; :func:`address` gives one for any writable buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

__all__ = ["EvpError", "XtsContext", "address"]

_SONAME = "libcrypto.so.3"


class EvpError(ValueError):
    """libcrypto refused a key or a call."""


def _load() -> ctypes.PyDLL:
    # PyDLL keeps the GIL over a call: cheaper than releasing it for calls of
    # a few microseconds at most (the bulk AES goes through cryptography).
    try:
        lib = ctypes.PyDLL(_SONAME)
    except OSError:
        found = ctypes.util.find_library("crypto")
        if found is None or not found.endswith(".so.3"):
            raise ImportError(f"gateway.crypto needs OpenSSL 3's {_SONAME}"
                              " (Debian package libssl3)") from None
        lib = ctypes.PyDLL(found)
    ptr = ctypes.c_void_p
    lib.EVP_CIPHER_fetch.argtypes = [ptr, ctypes.c_char_p, ctypes.c_char_p]
    lib.EVP_CIPHER_fetch.restype = ptr
    lib.EVP_CIPHER_free.argtypes = [ptr]
    lib.EVP_CIPHER_free.restype = None
    lib.EVP_CIPHER_CTX_new.argtypes = []
    lib.EVP_CIPHER_CTX_new.restype = ptr
    lib.EVP_CIPHER_CTX_free.argtypes = [ptr]
    lib.EVP_CIPHER_CTX_free.restype = None
    lib.ERR_clear_error.argtypes = []
    lib.ERR_clear_error.restype = None
    return lib


_LIB = _load()
# The two calls made per sector get no argtypes (fresh function objects, not the
# library's cached ones): ctypes then converts only what it is handed, a c_void_p
# for each pointer, bytes for the IV and small ints, which saves ~0.2 us a sector.
# Every pointer must be wrapped: a bare int would go as a C int.
_INIT, _UPDATE = _LIB["EVP_CipherInit_ex"], _LIB["EVP_CipherUpdate"]
_VOID_P = ctypes.c_void_p
_MAX_CALL = 1 << 30  # bytes in one call: EVP_CipherUpdate takes an int
_ALGORITHMS = {32: b"AES-128-XTS", 64: b"AES-256-XTS"}


def address(buf: Any) -> int:
    """The address of a writable buffer's first byte (the caller keeps it alive)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class XtsContext:
    """One AES-XTS key in one direction, with the IV given per call.

    Not thread-safe: each thread makes its own.  Buffers are passed as raw
    addresses, so callers must check lengths: an XTS call writes exactly
    ``length`` bytes.
    """

    def __init__(self, key: bytearray | memoryview, *, encrypt: bool) -> None:
        """``key``: both halves; writable, as it is read in place, not copied."""
        name = _ALGORITHMS.get(memoryview(key).nbytes)
        if name is None:
            raise EvpError("an XTS key is 32 or 64 bytes")
        self._ctx: ctypes.c_void_p | None = None
        self._out_len = ctypes.pointer(ctypes.c_int())  # EVP_CipherUpdate's, never read
        key_start = ctypes.c_char.from_buffer(key)
        cipher = _LIB.EVP_CIPHER_fetch(None, name, None)
        try:
            if not cipher:
                raise EvpError(f"libcrypto has no {name.decode()}")
            ctx = _LIB.EVP_CIPHER_CTX_new()
            if not ctx:
                raise MemoryError("EVP_CIPHER_CTX_new failed")
            self._ctx = _VOID_P(ctx)
            if _INIT(self._ctx, _VOID_P(cipher), None, ctypes.byref(key_start), None,
                     1 if encrypt else 0) != 1:
                raise EvpError("libcrypto refused the XTS key (are its halves equal?)")
        except BaseException:
            _LIB.ERR_clear_error()
            self.close()
            raise
        finally:
            _LIB.EVP_CIPHER_free(cipher)
            del key_start

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Free the context; libcrypto zeroes its key schedules."""
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            _LIB.EVP_CIPHER_CTX_free(ctx.value)

    def crypt(self, buf: int, length: int, iv: bytes) -> None:
        """XTS in place over ``length`` bytes at ``buf``, tweak ``iv`` (16 bytes)."""
        ctx = self._ctx
        if ctx is None:
            raise EvpError("the XTS context is closed")
        if not 0 < length <= _MAX_CALL or len(iv) != 16:
            raise EvpError(f"an XTS call takes 1 to {_MAX_CALL} bytes and a 16-byte IV")
        at = _VOID_P(buf)
        if _INIT(ctx, None, None, None, iv, -1) != 1 or _UPDATE(
                ctx, at, self._out_len, at, length) != 1:
            _LIB.ERR_clear_error()
            raise EvpError("libcrypto refused an XTS call")

    def crypt_sectors(self, buf: int, length: int, sector_size: int, iv: int,
                      iv_step: int, src: int | None = None) -> None:
        """:meth:`crypt` over each ``sector_size`` bytes of ``length`` at ``buf``,
        the first with IV ``iv`` (little-endian), each next one ``iv_step`` on
        (modulo 2**64, as plain64).  With ``src``, the input is read there, and
        must not overlap ``buf``."""
        ctx, out_len = self._ctx, self._out_len
        if ctx is None:
            raise EvpError("the XTS context is closed")
        if not 0 < sector_size <= _MAX_CALL:
            raise EvpError(f"an XTS call takes 1 to {_MAX_CALL} bytes")
        shift = 0 if src is None else src - buf
        for start in range(buf, buf + length, sector_size):
            out = _VOID_P(start)
            if _INIT(ctx, None, None, None, iv.to_bytes(16, "little"), -1) != 1 or _UPDATE(
                    ctx, out, out_len, _VOID_P(start + shift) if shift else out,
                    sector_size) != 1:
                _LIB.ERR_clear_error()
                raise EvpError("libcrypto refused an XTS call")
            iv = (iv + iv_step) & 0xFFFF_FFFF_FFFF_FFFF
