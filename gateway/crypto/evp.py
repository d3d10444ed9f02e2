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
    ptr, c_int = ctypes.c_void_p, ctypes.c_int
    lib.EVP_CIPHER_fetch.argtypes = [ptr, ctypes.c_char_p, ctypes.c_char_p]
    lib.EVP_CIPHER_fetch.restype = ptr
    lib.EVP_CIPHER_free.argtypes = [ptr]
    lib.EVP_CIPHER_free.restype = None
    lib.EVP_CIPHER_CTX_new.argtypes = []
    lib.EVP_CIPHER_CTX_new.restype = ptr
    lib.EVP_CIPHER_CTX_free.argtypes = [ptr]
    lib.EVP_CIPHER_CTX_free.restype = None
    lib.EVP_CipherInit_ex.argtypes = [ptr, ptr, ptr, ptr, ptr, c_int]
    lib.EVP_CipherInit_ex.restype = c_int
    lib.EVP_CipherUpdate.argtypes = [ptr, ptr, ptr, ptr, c_int]
    lib.EVP_CipherUpdate.restype = c_int
    lib.ERR_clear_error.argtypes = []
    lib.ERR_clear_error.restype = None
    return lib


_LIB = _load()
_INIT, _UPDATE = _LIB.EVP_CipherInit_ex, _LIB.EVP_CipherUpdate
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
        self._ctx: int | None = None
        self._out_len = ctypes.c_int()  # EVP_CipherUpdate's output length, never read
        self._out_len_address = ctypes.addressof(self._out_len)
        key_start = ctypes.c_char.from_buffer(key)
        cipher = _LIB.EVP_CIPHER_fetch(None, name, None)
        try:
            if not cipher:
                raise EvpError(f"libcrypto has no {name.decode()}")
            self._ctx = _LIB.EVP_CIPHER_CTX_new()
            if not self._ctx:
                raise MemoryError("EVP_CIPHER_CTX_new failed")
            if _INIT(self._ctx, cipher, None, ctypes.addressof(key_start), None,
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
            _LIB.EVP_CIPHER_CTX_free(ctx)

    def crypt(self, buf: int, length: int, iv: bytes) -> None:
        """XTS in place over ``length`` bytes at ``buf``, tweak ``iv`` (16 bytes)."""
        ctx = self._ctx
        if ctx is None:
            raise EvpError("the XTS context is closed")
        if _INIT(ctx, None, None, None, iv, -1) != 1 or _UPDATE(
                ctx, buf, self._out_len_address, buf, length) != 1:
            _LIB.ERR_clear_error()
            raise EvpError("libcrypto refused an XTS call")

    def crypt_sectors(self, buf: int, length: int, sector_size: int, iv: int,
                      iv_step: int) -> None:
        """:meth:`crypt` over each ``sector_size`` bytes of ``length`` at ``buf``,
        the first with IV ``iv`` (little-endian), each next one ``iv_step`` on
        (modulo 2**64, as plain64)."""
        ctx, out_len = self._ctx, self._out_len_address
        if ctx is None:
            raise EvpError("the XTS context is closed")
        for start in range(buf, buf + length, sector_size):
            if _INIT(ctx, None, None, None, iv.to_bytes(16, "little"), -1) != 1 or _UPDATE(
                    ctx, start, out_len, start, sector_size) != 1:
                _LIB.ERR_clear_error()
                raise EvpError("libcrypto refused an XTS call")
            iv = (iv + iv_step) & 0xFFFF_FFFF_FFFF_FFFF
