"""gateway.crypto.SectorCipher: aes-xts-plain64 with dm-crypt semantics."""

from __future__ import annotations

import mmap
import os
import random
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.crypto import CryptoError, SectorCipher
from gateway.crypto import xts

SECTOR_SIZES = (512, 1024, 2048, 4096)
MAX_SECTOR = 2**64 - 1


def reference(key: bytes, data: bytes, sector: int, sector_size: int, iv_tweak: int = 0,
              *, encrypt: bool = True) -> bytes:
    """One cryptography XTS call per sector, IV = plain64 in 512-byte units."""
    out = bytearray()
    for i in range(0, len(data), sector_size):
        iv = ((sector + i // sector_size) * (sector_size // 512) + iv_tweak) % 2**64
        cipher = Cipher(algorithms.AES(key), modes.XTS(iv.to_bytes(8, "little") + bytes(8)))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[i:i + sector_size]) + ctx.finalize()
    return bytes(out)


@pytest.fixture(params=["dispatch", "batched", "short"])
def path(request, monkeypatch):
    """Run a test as shipped, again with every size on the batched path (which
    4096-byte sectors never take), and again with every 512-byte-sector buffer on
    the short route."""
    if request.param == "batched":
        monkeypatch.setattr(xts, "_BATCH_BYTES", dict.fromkeys(SECTOR_SIZES[:-1], 0))
    elif request.param == "short":
        monkeypatch.setattr(xts, "_SMALL_BYTES", 0)
        monkeypatch.setattr(xts, "_BATCH_BYTES", dict.fromkeys(SECTOR_SIZES, 1 << 62))
    return request.param


# -- IEEE 1619 test vectors -----------------------------------------------------------
#
# IEEE Std 1619-2007 (P1619/D16) Annex B, XTS-AES vectors 4 and 10-14, as carried in
# Botan's src/tests/data/modes/xts.vec: 512-byte data units of bytes 00 01 .. ff 00 01
# .. ff, the data unit sequence number as the little-endian tweak.

IEEE_PLAIN = bytes(range(256)) * 2
IEEE_KEY_128 = bytes.fromhex("27182818284590452353602874713526"
                             "31415926535897932384626433832795")
IEEE_KEY_256 = bytes.fromhex("2718281828459045235360287471352662497757247093699959574966967627"
                             "3141592653589793238462643383279502884197169399375105820974944592")
IEEE_VECTORS = [
    pytest.param(IEEE_KEY_128, 0x00, (
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
        "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
        "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
        "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
        "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
        "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
        "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
        "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
        "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
        "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
        "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
        "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
        "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
        "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
        "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
        "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568"), id="vector4"),
    pytest.param(IEEE_KEY_256, 0xff, (
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
        "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
        "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
        "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca"
        "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0"
        "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
        "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec"
        "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a"
        "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
        "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae"
        "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29"
        "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
        "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f"
        "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385"
        "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
        "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"), id="vector10"),
    pytest.param(IEEE_KEY_256, 0xffff, (
        "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11"
        "e1d0225438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2"
        "469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d"
        "3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b201"
        "3fd0eeb8c2b8e3d8d240ccae2d4c98320a7442e1c8d75a42d6e6cfa4c2eca179"
        "8d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922a"
        "aa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c6"
        "9aac049921871ebb65301a4619ca80ecb485a31d744223ce8ddc2394828d6a80"
        "470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888a"
        "bf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab0"
        "18bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474afb75"
        "bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63"
        "094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a"
        "7e20dbdf308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca68"
        "6e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc090"
        "54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803"), id="vector11"),
    pytest.param(IEEE_KEY_256, 0xffffff, (
        "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200"
        "a8b490e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba049"
        "9298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a8"
        "7815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e1"
        "9110e84d1b1f199a2692119edc96132658f09da7c623efcec712537a3d94c0bf"
        "5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e"
        "62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6"
        "e7091ea6e232df0f9ad0d6cf502327876d82207abf2115cdacf6d5a48f6c1879"
        "a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe0"
        "97b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964"
        "c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71799d"
        "a3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7a"
        "f08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2"
        "480241b44d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace"
        "231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36"
        "ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826"), id="vector12"),
    pytest.param(IEEE_KEY_256, 0xffffffff, (
        "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5"
        "520f7c4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1"
        "c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac"
        "7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e"
        "919f5e942010a416e2bf48cb46993d3cb6a51c19bacf864785a00bc2ecff15d3"
        "50875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f5"
        "69768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed9"
        "0fdea39fa469494d3866c31e05f295ff21fea8d4e6e13d67e47ce722e9698a1c"
        "1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053"
        "027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e7"
        "5d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00f1df"
        "73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc00"
        "77ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460"
        "d183f04404a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a4155"
        "6cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88c"
        "f6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220"), id="vector13"),
    pytest.param(IEEE_KEY_256, 0xffffffffff, (
        "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23"
        "50eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b80"
        "8da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604"
        "e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4"
        "a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b"
        "50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434"
        "631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d8"
        "76c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff"
        "3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41b"
        "f6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f6"
        "85b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa"
        "6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abc"
        "e19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a"
        "0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd9272120546"
        "81d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de"
        "6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9"), id="vector14"),
]


@pytest.mark.parametrize("key, unit, ciphertext", IEEE_VECTORS)
def test_ieee_1619_vectors(key: bytes, unit: int, ciphertext: str, path: str) -> None:
    expected = bytes.fromhex(ciphertext)
    with SectorCipher(key) as cipher:
        assert cipher.encrypt(IEEE_PLAIN, unit) == expected
        assert cipher.decrypt(expected, unit) == IEEE_PLAIN
        # The same sector among others (wrapping past 2**64 for unit 0), so that
        # the batched path serves it at the default threshold too.
        many = cipher.encrypt(IEEE_PLAIN * 9, (unit - 4) % 2**64)
        assert many[4 * 512:5 * 512] == expected
    with SectorCipher(bytearray(key), 512, iv_tweak=unit) as cipher:
        assert cipher.encrypt(IEEE_PLAIN, 0) == expected


# -- agreement with cryptography, one call per sector -----------------------------------

def test_random_buffers_match_per_sector_xts(path: str) -> None:
    rng = random.Random(1619)
    for _ in range(40):
        key = rng.randbytes(rng.choice((32, 64)))
        size = rng.choice(SECTOR_SIZES)
        nsectors = rng.choice((1, 2, 3, 5, 8, 17, 64, 127, 300))
        sector = rng.choice((0, 1, rng.randrange(2**32), rng.randrange(2**64),
                             MAX_SECTOR - rng.randrange(nsectors + 2)))
        iv_tweak = rng.choice((0, 1, rng.randrange(2**64), 2**64 - 1))
        data = rng.randbytes(nsectors * size)
        expected = reference(key, data, sector, size, iv_tweak)
        with SectorCipher(key, size, iv_tweak) as cipher:
            assert cipher.encrypt(data, sector) == expected
            assert cipher.decrypt(expected, sector) == data
            assert reference(key, expected, sector, size, iv_tweak, encrypt=False) == data


@settings(max_examples=60, deadline=None)
@given(
    key_size=st.sampled_from((32, 64)),
    size=st.sampled_from(SECTOR_SIZES),
    nsectors=st.integers(1, 300),
    sector=st.one_of(st.integers(0, 2**16), st.integers(0, MAX_SECTOR),
                     st.integers(MAX_SECTOR - 300, MAX_SECTOR)),
    iv_tweak=st.one_of(st.just(0), st.integers(0, 2**64 - 1)),
    seed=st.integers(0, 2**32),
)
def test_property_matches_per_sector_xts(key_size: int, size: int, nsectors: int, sector: int,
                                         iv_tweak: int, seed: int) -> None:
    rng = random.Random(seed)
    key, data = rng.randbytes(key_size), rng.randbytes(nsectors * size)
    if key[:key_size // 2] == key[key_size // 2:]:
        return
    with SectorCipher(key, size, iv_tweak) as cipher:
        encrypted = cipher.encrypt(data, sector)
        assert encrypted == reference(key, data, sector, size, iv_tweak)
        assert cipher.decrypt(encrypted, sector) == data


@pytest.mark.parametrize("iv_tweak", [0, 5, 2**64 - 3])
def test_large_sectors_count_iv_in_512_byte_units(iv_tweak: int, path: str) -> None:
    key = os.urandom(64)
    data = os.urandom(12 * 4096)
    first = 2**61 - 5  # 8 * sector wraps past 2**64 within the buffer
    with SectorCipher(key, 4096, iv_tweak) as cipher:
        encrypted = cipher.encrypt(data, first)
    for k in range(12):
        iv = (8 * (first + k) + iv_tweak) % 2**64
        one_call = Cipher(algorithms.AES(key), modes.XTS(iv.to_bytes(16, "little"))).encryptor()
        assert encrypted[k * 4096:(k + 1) * 4096] == one_call.update(data[k * 4096:(k + 1) * 4096])


def test_sectors_wrap_at_2_64(path: str) -> None:
    key, data = os.urandom(64), os.urandom(6 * 512)
    with SectorCipher(key) as cipher:
        across = cipher.encrypt(data, MAX_SECTOR - 2)
        assert across[3 * 512:] == cipher.encrypt(data[3 * 512:], 0)
        assert across[:3 * 512] == cipher.encrypt(data[:3 * 512], MAX_SECTOR - 2)


@pytest.mark.parametrize("size", SECTOR_SIZES)
@pytest.mark.parametrize("sector", [123456789, MAX_SECTOR - 300])
def test_spans_several_chunks(size: int, sector: int) -> None:
    key = os.urandom(64)
    data = os.urandom(xts._SPAN * 2 + 3 * size)
    with SectorCipher(key, size, 77) as cipher:
        encrypted = cipher.encrypt(data, sector)
        assert encrypted == reference(key, data, sector, size, 77)
        buf = bytearray(data)
        cipher.encrypt_into(buf, sector)
        assert buf == encrypted


def _check_both_apis(key: bytes, data: bytes, sector: int, size: int, iv_tweak: int) -> None:
    """encrypt()/decrypt() and the _into pair agree with per-sector cryptography."""
    expected = reference(key, data, sector, size, iv_tweak)
    with SectorCipher(key, size, iv_tweak) as cipher:
        encrypted = cipher.encrypt(data, sector)
        assert type(encrypted) is bytes and encrypted == expected
        assert cipher.decrypt(expected, sector) == data
        buf = bytearray(data)
        cipher.encrypt_into(buf, sector)
        assert buf == expected
        cipher.decrypt_into(buf, sector)
        assert buf == data


@pytest.mark.parametrize("size", SECTOR_SIZES)
@pytest.mark.parametrize("sector, iv_tweak", [(0, 0), (12345, 99), (MAX_SECTOR, 0),
                                              (MAX_SECTOR - 1, 2**64 - 7)])
def test_one_sector(size: int, sector: int, iv_tweak: int, path: str) -> None:
    """A lone sector (one cryptography call as shipped), also as a slice of a larger buffer."""
    key, data = os.urandom(64), os.urandom(size)
    _check_both_apis(key, data, sector, size, iv_tweak)
    expected = reference(key, data, sector, size, iv_tweak)
    outer = bytearray(b"\xaa" * 7) + bytearray(data) + bytearray(b"\x55" * 9)
    with SectorCipher(key, size, iv_tweak) as cipher:
        cipher.encrypt_into(memoryview(outer)[7:7 + size], sector)
    assert outer == b"\xaa" * 7 + expected + b"\x55" * 9


@pytest.mark.parametrize("size", SECTOR_SIZES)
@pytest.mark.parametrize("edge", ["small", "batch", "chunk", "span"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_sizes_straddling_thresholds(size: int, edge: str, delta: int) -> None:
    """One sector either side of the short route, the batched path (4096-byte
    sectors: 4 MiB of calls), a chunk and a span."""
    limit = {"small": xts._SMALL_BYTES, "batch": xts._BATCH_BYTES.get(size, 4 * xts._SPAN),
             "chunk": xts._CHUNK, "span": xts._SPAN}[edge]
    nsectors = max(1, -(-limit // size) + delta)
    key, data = os.urandom(64), os.urandom(nsectors * size)
    _check_both_apis(key, data, MAX_SECTOR - nsectors // 2, size, 2**63 + 5)


def test_encrypt_results_are_independent() -> None:
    """Each batched encrypt() returns its own bytes: a later call leaves it alone."""
    key = os.urandom(64)
    first_data, second_data = os.urandom(xts._SPAN), os.urandom(xts._SPAN)
    with SectorCipher(key) as cipher:
        first = cipher.encrypt(first_data, 1)
        snapshot = bytes(bytearray(first))
        second = cipher.encrypt(second_data, 1)
        cipher.decrypt(second, 1)
    assert first == snapshot == reference(key, first_data, 1, 512)
    assert second == reference(key, second_data, 1, 512)


# -- in place ----------------------------------------------------------------------------

@pytest.mark.parametrize("nsectors", [1, 3, 40])
def test_into_bytearray_and_memoryview_slices(nsectors: int, path: str) -> None:
    key = os.urandom(64)
    data = os.urandom(nsectors * 512)
    expected = reference(key, data, 9, 512)
    with SectorCipher(key) as cipher:
        buf = bytearray(data)
        cipher.encrypt_into(buf, 9)
        assert buf == expected
        cipher.decrypt_into(buf, 9)
        assert buf == data
        # A slice at an odd offset: only it changes, unaligned for numpy.
        outer = bytearray(b"\xaa" * 3) + bytearray(data) + bytearray(b"\x55" * 5)
        view = memoryview(outer)[3:3 + len(data)]
        cipher.encrypt_into(view, 9)
        assert outer == b"\xaa" * 3 + expected + b"\x55" * 5
        cipher.decrypt_into(view, 9)
        assert outer[3:3 + len(data)] == data


def test_into_mmap(path: str) -> None:
    key, data = os.urandom(32), os.urandom(16 * 4096)
    with SectorCipher(key, 4096) as cipher, mmap.mmap(-1, len(data)) as area:
        area[:] = data
        cipher.encrypt_into(area, 3)
        assert area[:] == reference(key, data, 3, 4096)
        cipher.decrypt_into(area, 3)
        assert area[:] == data


def test_accepts_any_bytes_like_input(path: str) -> None:
    key, data = os.urandom(64), os.urandom(8 * 512)
    expected = reference(key, data, 0, 512)
    with SectorCipher(memoryview(key)) as cipher:
        for value in (data, bytearray(data), memoryview(data), memoryview(data).cast("Q")):
            assert cipher.encrypt(value, 0) == expected


@pytest.mark.parametrize("size", SECTOR_SIZES)
@pytest.mark.parametrize("copied", [True, False])
def test_encrypt_reads_an_unaligned_read_only_slice(size: int, copied: bool, path: str) -> None:
    """encrypt()/decrypt() read their input where it lies (or copy it, when small) and
    write only their result."""
    nsectors = 5 if copied else xts._COPY_BYTES // size + 1
    key, data = os.urandom(64), os.urandom(3 + nsectors * size)
    before = bytes(bytearray(data))
    with SectorCipher(key, size) as cipher:
        encrypted = cipher.encrypt(memoryview(data)[3:], 41)
        assert encrypted == reference(key, data[3:], 41, size)
        assert cipher.decrypt(memoryview(b"." + encrypted)[1:], 41) == data[3:]
    assert data == before


def test_threads_share_a_cipher() -> None:
    key = os.urandom(64)
    cipher = SectorCipher(key)
    jobs = [(os.urandom(n * 512), s) for n, s in [(300, 0), (64, 2**40), (5, 7), (2048, 3)] * 3]
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        data, sector = jobs[i]
        for _ in range(3):
            results[i] = cipher.encrypt(data, sector)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, (data, sector) in enumerate(jobs):
        assert results[i] == reference(key, data, sector, 512)


# -- errors and key handling ----------------------------------------------------------

@pytest.mark.parametrize("length", [0, 16, 31, 33, 48, 63, 65, 128])
def test_bad_key_length(length: int) -> None:
    with pytest.raises(CryptoError):
        SectorCipher(os.urandom(length))


def test_equal_key_halves_rejected() -> None:
    half = os.urandom(32)
    with pytest.raises(CryptoError):
        SectorCipher(half + half)


@pytest.mark.parametrize("size", [0, 256, 500, 768, 1000, 8192, -512])
def test_bad_sector_size(size: int) -> None:
    with pytest.raises(CryptoError):
        SectorCipher(os.urandom(64), size)


@pytest.mark.parametrize("iv_tweak", [-1, 2**64])
def test_bad_iv_tweak(iv_tweak: int) -> None:
    with pytest.raises(CryptoError):
        SectorCipher(os.urandom(64), 512, iv_tweak)


@pytest.mark.parametrize("size", SECTOR_SIZES)
@pytest.mark.parametrize("length", [1, 16, 511, 513])
def test_misaligned_length(size: int, length: int) -> None:
    cipher = SectorCipher(os.urandom(64), size)
    data = bytes(size * 3 + length % size or length)
    for call in (cipher.encrypt, cipher.decrypt):
        with pytest.raises(CryptoError):
            call(data, 0)
    for call in (cipher.encrypt_into, cipher.decrypt_into):
        with pytest.raises(CryptoError):
            call(bytearray(data), 0)


@pytest.mark.parametrize("sector", [-1, 2**64])
def test_sector_out_of_range(sector: int) -> None:
    with pytest.raises(CryptoError):
        SectorCipher(os.urandom(64)).encrypt(bytes(512), sector)


def test_empty_buffer() -> None:
    cipher = SectorCipher(os.urandom(64))
    assert cipher.encrypt(b"", 5) == b""
    cipher.decrypt_into(bytearray(), 5)


def test_into_needs_a_writable_buffer() -> None:
    with pytest.raises(TypeError):
        SectorCipher(os.urandom(64)).encrypt_into(bytes(4096), 0)


def test_close_zeroes_the_key_and_disables() -> None:
    key = bytearray(os.urandom(64))
    with SectorCipher(key) as cipher:
        cipher.encrypt(bytes(64 * 512), 0)  # builds per-thread contexts
        copy = cipher._key
        assert copy == key and copy is not key
    assert copy == bytes(64)
    assert key != bytes(64)  # the caller's key is the caller's
    for call in (lambda: cipher.encrypt(bytes(512), 0),
                 lambda: cipher.decrypt_into(bytearray(512), 0)):
        with pytest.raises(CryptoError):
            call()
    cipher.close()


def test_repr_hides_the_key() -> None:
    key = os.urandom(64)
    cipher = SectorCipher(key, 4096, 3)
    text = repr(cipher)
    assert "4096" in text and "AES-256-XTS" in text
    for window in range(0, 64, 4):
        assert key[window:window + 4].hex() not in text
    assert "AES-128-XTS" in repr(SectorCipher(os.urandom(32)))


@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("key_size", [32, 64])
def test_decrypt_many_matches_one_buffer_at_a_time(sector_size: int, key_size: int) -> None:
    """decrypt_many over buffers of 1-16 sectors at scattered sector numbers (some
    wrapping at 2**64, some in one batch past MANY_BYTES) equals per-sector XTS."""
    rnd = random.Random(sector_size + key_size)
    key = os.urandom(key_size)
    cipher = SectorCipher(key, sector_size, iv_tweak=rnd.randrange(2**64))
    for count, most, same in ((1, 4, False), (2, 1, False), (17, 8, False), (16, 8, True),
                              (40, 16, False), (70, 16, False)):
        items = []
        for _ in range(count):
            n = most if same else rnd.randint(1, most)
            sector = rnd.choice([rnd.randrange(2**40), MAX_SECTOR - rnd.randrange(n)])
            items.append((bytearray(os.urandom(n * sector_size)), sector))
        expected = [reference(key, bytes(buf), sector, sector_size, cipher._iv_tweak,
                              encrypt=False) for buf, sector in items]
        many = sum(len(buf) for buf, _ in items) > xts.MANY_BYTES
        cipher.decrypt_many([(memoryview(buf), sector) for buf, sector in items])
        assert [bytes(buf) for buf, _ in items] == expected, (count, many)
    with pytest.raises(TypeError):
        cipher.decrypt_many([(bytearray(sector_size), 0), (bytes(sector_size), 1)])
    with pytest.raises(CryptoError):
        cipher.decrypt_many([(bytearray(sector_size), 0), (bytearray(100), 1)])
