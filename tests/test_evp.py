"""gateway.crypto.evp: libcrypto's XTS contexts against cryptography's XTS."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.crypto.evp import EvpError, XtsContext, address


def reference(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.XTS(iv))
    return (cipher.encryptor() if encrypt else cipher.decryptor()).update(data)


@pytest.mark.parametrize("key_size", [32, 64])
@pytest.mark.parametrize("encrypt", [True, False])
def test_crypt_matches_cryptography_for_each_iv(key_size: int, encrypt: bool) -> None:
    key = bytearray(os.urandom(key_size))
    context = XtsContext(key, encrypt=encrypt)
    for length in (16, 512, 4096, 4096 + 48, 65536):
        for _ in range(3):  # a new IV each call, on the one context
            data, iv = os.urandom(length), os.urandom(16)
            buf = bytearray(data)
            context.crypt(address(buf), length, iv)
            assert bytes(buf) == reference(bytes(key), iv, data, encrypt)


def test_the_key_is_read_not_kept() -> None:
    key = bytearray(os.urandom(64))
    data, iv = os.urandom(512), os.urandom(16)
    context = XtsContext(key, encrypt=True)
    expected = reference(bytes(key), iv, data, True)
    key[:] = bytes(64)  # the caller may zero its copy at once
    buf = bytearray(data)
    context.crypt(address(buf), 512, iv)
    assert bytes(buf) == expected


@pytest.mark.parametrize("key", [bytearray(31), bytearray(48), bytearray(65)])
def test_bad_key_size(key: bytearray) -> None:
    with pytest.raises(EvpError, match="32 or 64"):
        XtsContext(key, encrypt=True)


def test_equal_halves_refused_by_libcrypto() -> None:
    half = os.urandom(32)  # refused for encryption (IEEE 1619); SectorCipher refuses both
    with pytest.raises(EvpError, match="refused"):
        XtsContext(bytearray(half + half), encrypt=True)


def test_read_only_key_refused() -> None:
    with pytest.raises(TypeError):
        XtsContext(os.urandom(64), encrypt=True)  # type: ignore[arg-type]


def test_too_short_call_is_an_error_not_a_crash() -> None:
    context = XtsContext(bytearray(os.urandom(64)), encrypt=True)
    buf = bytearray(15)  # XTS needs a whole block
    with pytest.raises(EvpError, match="refused"):
        context.crypt(address(buf), len(buf), bytes(16))
    big = bytearray(512)  # and the context still works afterwards
    context.crypt(address(big), 512, bytes(16))
    assert big != bytearray(512)


def test_closed_context_raises() -> None:
    context = XtsContext(bytearray(os.urandom(64)), encrypt=True)
    context.close()
    context.close()  # twice is harmless
    buf = bytearray(512)
    with pytest.raises(EvpError, match="closed"):
        context.crypt(address(buf), 512, bytes(16))
    with pytest.raises(EvpError, match="closed"):
        context.crypt_sectors(address(buf), 512, 512, 0, 1)
    assert buf == bytearray(512)


def test_address_needs_a_writable_buffer() -> None:
    with pytest.raises(TypeError):
        address(b"read only")
    buf = bytearray(b"abc")
    assert address(buf) == address(memoryview(buf))


@pytest.mark.parametrize("sector_size, iv_step", [(512, 1), (4096, 8)])
def test_crypt_sectors_steps_the_iv_and_wraps(sector_size: int, iv_step: int) -> None:
    key = bytearray(os.urandom(64))
    first = 2**64 - 2 * iv_step  # the third sector's IV wraps to 0
    data = os.urandom(5 * sector_size)
    buf = bytearray(data)
    XtsContext(key, encrypt=False).crypt_sectors(address(buf), len(buf), sector_size, first,
                                                 iv_step)
    for i in range(5):
        iv = ((first + i * iv_step) % 2**64).to_bytes(16, "little")
        part = slice(i * sector_size, (i + 1) * sector_size)
        assert bytes(buf[part]) == reference(bytes(key), iv, data[part], False)


def test_crypt_sectors_from_another_buffer() -> None:
    key = bytearray(os.urandom(64))
    data = os.urandom(3 * 4096)
    source, out = bytearray(data), bytearray(len(data))
    XtsContext(key, encrypt=True).crypt_sectors(address(out), len(out), 4096, 80, 8,
                                                src=address(source))
    assert source == data  # the input is only read
    for i in range(3):
        part = slice(i * 4096, (i + 1) * 4096)
        iv = (80 + 8 * i).to_bytes(16, "little")
        assert bytes(out[part]) == reference(bytes(key), iv, data[part], True)


@pytest.mark.parametrize("length, iv", [(0, bytes(16)), (1 << 31, bytes(16)),
                                        (512, bytes(8)), (512, bytes(17))])
def test_call_sizes_checked_before_libcrypto(length: int, iv: bytes) -> None:
    context = XtsContext(bytearray(os.urandom(64)), encrypt=True)
    buf = bytearray(512)
    with pytest.raises(EvpError, match="1 to"):
        context.crypt(address(buf), length, iv)
    for sector_size in (0, 1 << 31):
        with pytest.raises(EvpError, match="1 to"):
            context.crypt_sectors(address(buf), 512, sector_size, 0, 1)
    assert buf == bytearray(512)
