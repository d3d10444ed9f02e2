"""Hypothesis fuzzing of the LUKS2 parser: only FormatError, never a crash or a hang.

Layers fuzzed, from the outside in:

* ``fmt.read`` on random blobs and on synthetic binary headers (checksummed or not);
* ``fmt.read`` + ``fmt.unlock`` on a valid eVLU image with byte flips, truncations
  and splices, and after rewriting both header copies with a mutated JSON area
  and a correct checksum (so the JSON validator and the keyslot code are reached);
* ``metadata.decode`` on arbitrary bytes, generated JSON values, deep nesting and
  the valid metadata with one field replaced, deleted or added; after a
  successful decode every accessor also raises only FormatError, and
  ``encode()`` output decodes back to the same object;
* ``af.merge`` and ``keyslot.unwrap`` with random parameters (FormatError, or
  ValueError from ``af`` as documented there).

Every example must finish within ``BUDGET`` seconds: a slow input is a hang.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from gateway import format as fmt
from gateway.backstore import MemoryBackstore
from gateway.format import af, binary, disk, keyslot, luks2, metadata
from gateway.format.errors import FormatError
from gateway.format.metadata import Kdf, Keyslot

HDR = 0x4000
JSON_SIZE = HDR - 4096
IMAGE_SIZE = 2 << 20
KEK = bytes(range(32))
KEK2 = bytes(range(100, 132))
WRONG_KEK = bytes(32)
BUDGET = 10.0  # seconds per example (honest ones take < 0.3 s): costly inputs must be refused

FAST = settings(max_examples=150, deadline=None)


@contextmanager
def budget(seconds: float = BUDGET) -> Iterator[None]:
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.1f} s: a hostile header can stall the parser"


# -- the valid image every mutation starts from --------------------------------------------------

@functools.cache
def valid() -> tuple[bytes, bytes, fmt.Header]:
    """A 2 MiB eVLU: two evlu-kmip bindings and a foreign token; (image, DEK, header)."""
    dev = MemoryBackstore(IMAGE_SIZE)
    header, dek = fmt.create(dev, KEK, fmt.Binding("fuzz-key", "fuzz"), data_offset=fmt.MIN_DATA_OFFSET)
    header = fmt.add_binding(dev, header, dek, KEK2, fmt.Binding("fuzz-dr", "dr"))
    obj = header.metadata.to_json()
    obj["tokens"]["5"] = {"type": "acme", "keyslots": [], "note": "x", "n": [1, 2.5, None, True]}
    header = disk.write(dev, header.with_metadata(fmt.Metadata(obj, HDR)))
    return dev.data, bytes(dek), header


def valid_obj() -> dict:
    return valid()[2].metadata.to_json()


def pad(text: bytes, size: int = JSON_SIZE) -> bytes:
    return text[:size] + bytes(max(0, size - len(text)))


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def with_json_area(area: bytes, *, primary: bool = True, secondary: bool = True) -> bytes:
    """The valid image with ``area`` as the JSON area of the chosen copies, correctly
    checksummed (BinaryHeader.pack) with a higher seqid, so fmt.read must judge the JSON."""
    image, _, header = valid()
    out = bytearray(image)
    for is_primary, wanted in ((True, primary), (False, secondary)):
        if not wanted:
            continue
        offset = 0 if is_primary else HDR
        bh = binary.BinaryHeader(primary=is_primary, hdr_size=HDR, seqid=header.seqid + 1,
                                 label=header.label, uuid=header.uuid, subsystem=header.subsystem,
                                 salt=header.salts[0 if is_primary else 1], hdr_offset=offset)
        out[offset:offset + HDR] = bh.pack(area)
    return bytes(out)


# -- oracles ----------------------------------------------------------------------------------

def exercise(md: fmt.Metadata) -> None:
    """Every accessor of a decoded Metadata raises only FormatError; encode() round-trips."""
    for call in (lambda: md.data_segment, md.evlu_tokens, lambda: md.digest_for_segment(0),
                 lambda: md.digest_for_keyslot(0), md.to_json, lambda: dict(md.keyslots),
                 lambda: md.requirements):
        try:
            call()
        except FormatError:
            pass
    for ks in md.keyslots:
        try:
            md.digest_for_keyslot(ks)
        except FormatError:
            pass
    try:
        area = md.encode()
    except FormatError:
        return
    again = metadata.decode(area, md.hdr_size)
    assert again.to_json() == md.to_json()


_UNLOCK_SEEN: set[bytes] = set()  # (metadata, keyslot bytes) already unlocked: same input, same result


def _unlock_key(dev: MemoryBackstore, md: fmt.Metadata) -> bytes:
    h = hashlib.sha256(json.dumps(md.to_json(), sort_keys=True).encode())
    h.update(str(dev.size).encode())
    h.update(dev.pread(max(0, min(dev.size, fmt.MIN_DATA_OFFSET) - 2 * HDR), 2 * HDR)
             if dev.size > 2 * HDR else b"")
    return h.digest()


def read_and_unlock(image: bytes) -> None:
    """fmt.read, accessors, unlock with the right and a wrong KEK, repair: only FormatError.
    An unlock that succeeds must return the real DEK (the digest protects it)."""
    dek = valid()[1]
    dev = MemoryBackstore.from_bytes(image)
    with budget():
        try:
            result = fmt.read(dev)
        except FormatError as exc:
            event(f"read: {type(exc).__name__}")
            assert isinstance(fmt.probe(dev), bool)
            return
        event(f"read: ok, repair {'needed' if result.needs_repair else 'not needed'}")
        header = result.header
        exercise(header.metadata)
        try:
            tokens = header.metadata.evlu_tokens()
        except FormatError:
            tokens = []
        seen = _unlock_key(dev, header.metadata)
        if seen not in _UNLOCK_SEEN:  # the AF merge is slow: do not redo identical unlocks
            _UNLOCK_SEEN.add(seen)
            for kek, token in ((KEK, None), (WRONG_KEK, tokens[0] if tokens else None)):
                try:
                    got = fmt.unlock(dev, header, kek, token)
                except FormatError as exc:
                    event(f"unlock {'right' if kek == KEK else 'wrong'} KEK: {type(exc).__name__}")
                    continue
                event(f"unlock {'right' if kek == KEK else 'wrong'} KEK: ok")
                assert kek == KEK and got == dek, "unlock returned a key the digest should have refused"
        # repairing the chosen copy gives a device that reads back the same, needing no repair
        if result.needs_repair and len(image) >= 2 * header.hdr_size:
            try:
                fmt.repair(dev, result)
            except FormatError:
                return
            again = fmt.read(dev)
            assert not again.needs_repair, again.problems
            assert again.header.metadata.to_json() == header.metadata.to_json()


# -- strategies ---------------------------------------------------------------------------------

SCHEMA_WORDS = ["luks2", "reencrypt", "pbkdf2", "argon2i", "argon2id", "luks1", "raw", "crypt",
                "linear", "dynamic", "aes-xts-plain64", "aes-cbc-essiv:sha256", "sha1", "sha256",
                "sha512", "md5", "whirlpool", "evlu-kmip", "luks2-keyring", "", "0", "1", "7", "31",
                "32", "-1", "01", " 1", "1.0", "4096", "32768", "1040384", "18446744073709551615",
                "18446744073709551616", "99999999999999999999999", "AAAA", "AA==", "====", "A",
                "\u0000", "\udc80", "\u00e9"]
texts = st.text(max_size=12) | st.sampled_from(SCHEMA_WORDS)
ints = st.integers() | st.integers(-2**70, 2**70) | st.sampled_from(
    [0, 1, -1, 511, 512, 513, 4096, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, 10**30])
# ints that cannot make a KDF run for long (the full unlock path runs the KDFs they configure)
cheap_ints = st.integers(-3, 5000) | st.sampled_from(
    [0, 1, 4, 8, 16, 32, 48, 64, 65, 511, 512, 513, 4096, 4097, 65536, 65537, 2**32 - 1, 2**32,
     2**63 - 1, 2**63, 2**64, -2**63, 50_000_001, 10**30])
scalars = (st.none() | st.booleans() | ints | texts
           | st.floats(allow_nan=True, allow_infinity=True))
cheap_scalars = st.none() | st.booleans() | cheap_ints | texts | st.floats(allow_nan=False)


def json_values(leaves: st.SearchStrategy = scalars, max_leaves: int = 12) -> st.SearchStrategy:
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(texts, kids, max_size=4), max_leaves=max_leaves)


def luks2_shaped(values: st.SearchStrategy) -> st.SearchStrategy:
    """Objects with the five LUKS2 sections, numbered children, random content."""
    ids = st.sampled_from(["0", "1", "2", "31", "32", "00", "a", "-1"])
    section = st.dictionaries(ids, st.dictionaries(st.sampled_from(
        ["type", "keyslots", "segments", "key_size", "af", "area", "kdf", "offset", "size",
         "iv_tweak", "encryption", "sector_size", "hash", "iterations", "salt", "digest",
         "key_id", "kms"]) | texts, values, max_size=8) | values, max_size=3)
    config = st.fixed_dictionaries({"json_size": st.sampled_from([str(JSON_SIZE), "0", 12288]),
                                    "keyslots_size": st.sampled_from(["1032192", "4096", "1"]) | values})
    return st.fixed_dictionaries({"keyslots": section, "tokens": section, "segments": section,
                                  "digests": section, "config": config})


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@functools.cache
def tree_paths() -> list[tuple]:
    return [p for p in _paths(valid_obj()) if p]


def edit(obj: Any, path: tuple, action: str, value: Any, new_key: str) -> Any:
    """Replace, delete or add next to the node at ``path`` (on a copy)."""
    obj = copy.deepcopy(obj)
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[new_key] = value
    else:
        parent.insert(last, value)
    return obj


def tree_edits(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(tree_paths()), st.sampled_from(["replace", "replace", "delete", "add"]),
                     values, texts)


# =================================================================================================
# fmt.read on blobs and synthetic binary headers
# =================================================================================================

MAGICS = [binary.MAGIC_PRIMARY, binary.MAGIC_SECONDARY, b"LUKS\xba\xbf", b"SKUL\xba\xbf",
          b"LUKS\0\0", b"\0" * 6]


@FAST
@given(prefix=st.binary(max_size=600), magic=st.sampled_from(MAGICS) | st.binary(min_size=6, max_size=6),
       size=st.sampled_from([0, 5, 6, 100, 4095, 4096, 4097, 16383, 16384, 32768, 65536 + 4096]),
       second=st.sampled_from([None, *binary.HDR_SIZES[:4]]), fill=st.sampled_from([0, 0xFF, 0x20]))
def test_read_random_blobs(prefix: bytes, magic: bytes, size: int, second: int | None, fill: int) -> None:
    blob = bytearray(bytes([fill]) * max(size, len(prefix) + 6))
    blob[:6 + len(prefix)] = magic + prefix
    if second is not None and len(blob) >= second + 6 + len(prefix):
        blob[second:second + 6 + len(prefix)] = binary.MAGIC_SECONDARY + prefix
    dev = MemoryBackstore.from_bytes(blob)
    with budget():
        assert isinstance(fmt.probe(dev), bool)
        try:
            fmt.read(dev)
        except FormatError:
            pass


_HEAD = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")


def raw_header(*, magic: bytes, version: int, hdr_size: int, seqid: int, label: bytes,
               csum_alg: bytes, salt: bytes, uuid: bytes, subsystem: bytes, hdr_offset: int,
               json_area: bytes, good_csum: bool) -> bytes:
    """A binary header packed independently of gateway.format.binary; the checksum is
    sha256 over the 4096-byte header with csum zeroed, then the JSON area (LUKS2 spec)."""
    head = bytearray(_HEAD.pack(magic, version, hdr_size, seqid, label, csum_alg, salt, uuid,
                                subsystem, hdr_offset, b"", b"")) + bytes(4096 - 512)
    csum = hashlib.sha256(bytes(head) + json_area).digest() if good_csum else bytes(64)
    head[448:448 + len(csum)] = csum
    return bytes(head) + json_area


u64 = st.integers(0, 2**64 - 1)
field_bytes = st.binary(max_size=64) | st.sampled_from([b"", b"evlu", b"\xff\xfe", b"a" * 70])


@FAST
@given(primary=st.booleans(), version=st.sampled_from([2, 1, 3, 0xFFFF]),
       hdr_size=st.sampled_from([HDR, HDR, 0x8000, 0, 4096, 0x4001, 2**64 - 1]) | u64,
       seqid=u64, label=field_bytes, uuid=field_bytes, subsystem=field_bytes,
       csum_alg=st.sampled_from([b"sha256", b"sha256\0junk", b"sha1", b"SHA256", b"\xff"]),
       salt=st.binary(min_size=64, max_size=64), offset_kind=st.sampled_from(["right", "zero", "random"]),
       random_offset=u64, good_csum=st.booleans(),
       json_kind=st.sampled_from(["valid", "valid-16k-config", "random", "empty"]),
       json_noise=st.binary(max_size=64), keep_other_copy=st.booleans())
def test_read_synthetic_binary_headers(primary: bool, version: int, hdr_size: int, seqid: int,
                                       label: bytes, uuid: bytes, subsystem: bytes, csum_alg: bytes,
                                       salt: bytes, offset_kind: str, random_offset: int,
                                       good_csum: bool, json_kind: str, json_noise: bytes,
                                       keep_other_copy: bool) -> None:
    """Binary-header fields fuzzed, checksummed correctly or not, over the valid image."""
    image, _, _ = valid()
    out = bytearray(image)
    area_size = hdr_size - 4096 if hdr_size in binary.HDR_SIZES and hdr_size <= 0x8000 else JSON_SIZE
    obj = valid_obj()
    if json_kind == "valid":
        obj["config"]["json_size"] = str(area_size)
        text = encode_json(obj)
    elif json_kind == "valid-16k-config":
        text = encode_json(obj)
    elif json_kind == "random":
        text = json_noise
    else:
        text = b""
    json_area = pad(text, area_size)
    position = 0 if primary else (hdr_size if hdr_size in binary.HDR_SIZES and hdr_size <= 0x8000 else HDR)
    hdr_offset = {"right": position, "zero": 0, "random": random_offset}[offset_kind]
    raw = raw_header(magic=binary.MAGIC_PRIMARY if primary else binary.MAGIC_SECONDARY,
                     version=version, hdr_size=hdr_size % 2**64, seqid=seqid, label=label,
                     csum_alg=csum_alg, salt=salt, uuid=uuid, subsystem=subsystem,
                     hdr_offset=hdr_offset, json_area=json_area, good_csum=good_csum)
    out[position:position + len(raw)] = raw
    if not keep_other_copy:  # the fuzzed copy must stand on its own
        other = HDR if primary else 0
        if not position <= other < position + len(raw):
            out[other:other + 4096] = bytes(4096)
    read_and_unlock(bytes(out))


# =================================================================================================
# the valid image, mutated
# =================================================================================================

HEADER_REGION = 2 * HDR
KEYSLOT_REGION = 2 * HDR + 2 * luks2.KEYSLOT_AREA
SPOTS = [0, 6, 8, 16, 24, 72, 104, 168, 208, 256, 448, 480, 511, 4096, 4100, 8000, HDR, HDR + 8,
         HDR + 448, HDR + 4096, 2 * HDR, 2 * HDR + 100, KEYSLOT_REGION - 1]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, HEADER_REGION - 1) | st.sampled_from(SPOTS),
              st.integers(1, 255)),
    st.tuples(st.just("flip"), st.integers(0, KEYSLOT_REGION - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, IMAGE_SIZE) | st.sampled_from(SPOTS), st.just(0)),
    st.tuples(st.just("splice"), st.integers(0, HEADER_REGION) | st.sampled_from(SPOTS),
              st.integers(0, HEADER_REGION) | st.sampled_from(SPOTS), st.integers(1, 8192)),
    st.tuples(st.just("zero"), st.integers(0, KEYSLOT_REGION) | st.sampled_from(SPOTS),
              st.integers(1, 20000)),
    st.tuples(st.just("insert"), st.integers(0, HEADER_REGION) | st.sampled_from(SPOTS),
              st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, HEADER_REGION) | st.sampled_from(SPOTS),
              st.integers(1, 4096)),
)


def mutate(image: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(image)
    for op, a, *rest in ops:
        if op == "flip" and a < len(out):
            out[a] ^= rest[0]
        elif op == "truncate":
            del out[a:]
        elif op == "splice":  # copy a chunk elsewhere (e.g. primary bytes over the secondary)
            dst, length = rest
            chunk = out[a:a + length]
            out[dst:dst + len(chunk)] = chunk
        elif op == "zero":
            end = min(len(out), a + rest[0])
            out[a:end] = bytes(max(0, end - a))
        elif op == "insert":  # shifts everything behind it
            out[a:a] = rest[0]
            del out[IMAGE_SIZE:]
        elif op == "delete":
            del out[a:a + rest[0]]
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(mutation, min_size=1, max_size=6))
@example(ops=[("truncate", HDR + 4096, 0)])
@example(ops=[("flip", 100, 1)])  # primary bad: the secondary is used, then repaired
@example(ops=[("flip", HDR + 100, 1)])
@example(ops=[("flip", 480, 0xFF)])  # csum[32:64]: not covered by a sha256 checksum
@example(ops=[("splice", 0, HDR, 4096)])  # the primary's binary header over the secondary
@example(ops=[("zero", 2 * HDR, 20000)])  # keyslot 0 area destroyed: WrongKeyError
def test_read_mutated_image(ops: list[tuple]) -> None:
    read_and_unlock(mutate(valid()[0], ops))


# =================================================================================================
# the JSON layer: metadata.decode
# =================================================================================================

@FAST
@given(area=st.binary(max_size=2000), hdr_size=st.sampled_from(binary.HDR_SIZES) | st.integers(-1, 2**64),
       terminate=st.booleans())
def test_decode_arbitrary_bytes(area: bytes, hdr_size: int, terminate: bool) -> None:
    with budget():
        try:
            md = metadata.decode(area + (b"\0" if terminate else b""), hdr_size)
        except FormatError:
            return
        exercise(md)


def decode_and_exercise(obj_or_text: Any, hdr_size: int = HDR) -> fmt.Metadata | None:
    """Decode a JSON value (NaN/Infinity allowed, to be refused) or text; exercise the result."""
    text = obj_or_text if isinstance(obj_or_text, bytes) else json.dumps(obj_or_text).encode()
    with budget():
        try:
            md = metadata.decode(pad(text + b"\0", hdr_size - 4096), hdr_size)
        except FormatError as exc:
            where = str(exc).split(":")[0][:40].encode("ascii", "backslashreplace").decode()
            event(f"decode: {type(exc).__name__}: {where}")  # ASCII: hypothesis stores events as UTF-8
            return None
        event("decode: ok")
        exercise(md)
        return md


@FAST
@given(value=json_values(max_leaves=30))
def test_decode_json_values(value: Any) -> None:
    decode_and_exercise(value)


@FAST
@given(obj=luks2_shaped(json_values(max_leaves=6)))
def test_decode_luks2_shaped_values(obj: dict) -> None:
    decode_and_exercise(obj)


def nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# Depths up to 150 must parse and work; far beyond the interpreter's recursion limit (which
# hypothesis raises while it runs a test) the parser must refuse with FormatError.  The band
# in between is the xfail test below.
@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 150) | st.integers(6000, 20_000), kind=st.sampled_from(["list", "dict"]),
       where=st.sampled_from(["root", "token", "keyslot", "config"]))
@example(depth=100_000, kind="list", where="token")
@example(depth=50_000, kind="dict", where="root")
def test_decode_deep_nesting(depth: int, kind: str, where: str) -> None:
    obj = valid_obj()
    marker = "__DEEP__"
    if where == "token":
        obj["tokens"]["9"] = {"type": "acme", "keyslots": [], "v": marker}
    elif where == "keyslot":
        obj["keyslots"]["0"]["priority"] = marker
    elif where == "config":
        obj["config"]["flags"] = marker
    text = nested(depth, kind) if where == "root" else \
        json.dumps(obj).replace(f'"{marker}"', nested(depth, kind))
    hdr_size = next(s for s in binary.HDR_SIZES if s - 4096 > len(text) + 1)
    decode_and_exercise(text.encode(), hdr_size)


@pytest.mark.parametrize("depth", [600, 29])
def test_decode_refuses_nesting_cryptsetup_refuses(depth: int) -> None:
    """cryptsetup (json-c) refuses a token holding 29 nested lists; so do we, before any
    deep copy or rewrite could hit the recursion limit."""
    obj = valid_obj()
    obj["tokens"]["9"] = {"type": "acme", "keyslots": [], "v": "__DEEP__"}
    text = json.dumps(obj).replace('"__DEEP__"', nested(depth, "list")).encode()
    with pytest.raises(FormatError, match="nested deeper"):
        metadata.decode(pad(text + b"\0"), HDR)


def test_decode_accepts_nesting_cryptsetup_accepts() -> None:
    obj = valid_obj()
    obj["tokens"]["9"] = {"type": "acme", "keyslots": [], "v": "__DEEP__"}
    text = json.dumps(obj).replace('"__DEEP__"', nested(28, "list")).encode()
    exercise(metadata.decode(pad(text + b"\0"), HDR))


@FAST
@given(change=tree_edits(json_values(max_leaves=8)))
def test_decode_valid_metadata_with_one_field_changed(change: tuple) -> None:
    path, action, value, new_key = change
    obj = edit(valid_obj(), path, action, value, new_key)
    decode_and_exercise(obj)


@pytest.mark.parametrize("literal", [
    "0", "-0", "1.5", "-2.5e-3", "1e308", "1e-400", "123456789012345678901234567890", "1E+2",
])
def test_number_literals_survive_encode(literal: str) -> None:
    """A foreign token's number must not make the metadata un-re-encodable: what encode()
    writes, decode() must read (else any header rewrite bricks the device for us)."""
    obj = valid_obj()
    obj["tokens"]["9"] = {"type": "acme", "keyslots": [], "v": "__NUM__"}
    text = json.dumps(obj).replace('"__NUM__"', literal).encode()
    md = metadata.decode(pad(text + b"\0"), HDR)
    exercise(md)  # encode() -> decode() round trip


@pytest.mark.parametrize("literal", ["1e400", "-1E309"])
def test_out_of_range_numbers_are_refused(literal: str) -> None:
    """A number beyond the double range cannot be re-encoded faithfully: decode() refuses
    it with FormatError rather than letting a later rewrite write 'Infinity'."""
    obj = valid_obj()
    obj["tokens"]["9"] = {"type": "acme", "keyslots": [], "v": "__NUM__"}
    text = json.dumps(obj).replace('"__NUM__"', literal).encode()
    with pytest.raises(FormatError, match="does not parse"):
        metadata.decode(pad(text + b"\0"), HDR)


# =================================================================================================
# mutated JSON, re-checksummed into the image: fmt.read reaches the validator, unlock the keyslots
# =================================================================================================

@settings(max_examples=150, deadline=None)
@given(change=tree_edits(json_values(cheap_scalars, max_leaves=6)), both=st.booleans())
@example(change=(("keyslots", "0", "kdf", "iterations"), "replace", 50_000_001, ""), both=True)
@example(change=(("keyslots", "0", "area", "key_size"), "replace", 32, ""), both=True)
@example(change=(("keyslots", "0", "key_size"), "replace", 32, ""), both=True)
@example(change=(("digests", "0", "keyslots"), "replace", ["1"], ""), both=True)
@example(change=(("tokens", "0", "keyslots"), "replace", [], ""), both=True)
@example(change=(("segments", "0", "sector_size"), "replace", 4096, ""), both=True)
@example(change=(("keyslots", "1"), "delete", None, ""), both=True)
def test_unlock_with_one_field_changed(change: tuple, both: bool) -> None:
    path, action, value, new_key = change
    obj = edit(valid_obj(), path, action, value, new_key)
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(text) >= JSON_SIZE:
        text = text[:JSON_SIZE - 1]
    read_and_unlock(with_json_area(pad(text + b"\0"), secondary=both))


json_byte_edit = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2000), st.sampled_from(b'0123456789"{}[],:-+.eE \\\0x')),
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2000), st.sampled_from(b'0123456789"{}[],:-+.eE \\\0x')),
    st.tuples(st.just("delete"), st.integers(0, 2000), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(edits=st.lists(json_byte_edit, min_size=1, max_size=3))
def test_unlock_with_json_bytes_changed(edits: list[tuple]) -> None:
    text = bytearray(encode_json(valid_obj()))
    for op, pos, arg in edits:
        pos %= len(text) + 1
        if op == "set" and pos < len(text):
            text[pos] = arg
        elif op == "flip" and pos < len(text):
            text[pos] ^= arg
        elif op == "insert":
            text[pos:pos] = bytes([arg])
        elif op == "delete":
            del text[pos:pos + 1]
    read_and_unlock(with_json_area(pad(bytes(text) + b"\0")))


# =================================================================================================
# AF splitter and keyslot unwrap with random parameters
# =================================================================================================

AF_HASHES = ["sha1", "sha256", "sha512", "sha384", "sha224", "md5", "whirlpool", "", "SHA256"]


@FAST
@given(material=st.binary(max_size=4096), key_size=st.integers(-2, 600),
       stripes=st.integers(-2, 5000), hash_name=st.sampled_from(AF_HASHES))
def test_af_merge_random(material: bytes, key_size: int, stripes: int, hash_name: str) -> None:
    with budget():
        try:
            key = af.merge(material, key_size, stripes, hash_name)
        except ValueError:
            return
        assert len(key) == key_size


@settings(max_examples=30, deadline=None)
@given(key=st.binary(min_size=1, max_size=64), stripes=st.integers(1, 300),
       hash_name=st.sampled_from(["sha1", "sha256", "sha512", "sha384", "sha224"]))
def test_af_split_merge_round_trip(key: bytes, stripes: int, hash_name: str) -> None:
    material = af.split(key, stripes, hash_name)
    assert len(material) == len(key) * stripes
    assert af.merge(material, len(key), stripes, hash_name) == key


kdfs = st.one_of(
    st.builds(Kdf, type=st.just("pbkdf2"), salt=st.binary(max_size=64),
              hash=st.sampled_from(["sha1", "sha256", "sha512", "md5", "sha3-256", "", "whirlpool"]),
              iterations=st.integers(1, 2000) | st.sampled_from([50_000_001, 2**32 - 1])),
    st.builds(Kdf, type=st.sampled_from(["argon2i", "argon2id"]), salt=st.binary(max_size=64),
              time=st.integers(1, 3) | st.sampled_from([1001, 2**32 - 1]),
              memory=st.integers(8, 512) | st.sampled_from([4 * 1024 * 1024 + 1, 2**32 - 1]),
              cpus=st.integers(1, 8) | st.sampled_from([64])),
)


@st.composite
def keyslots(draw: st.DrawFn) -> Keyslot:
    """Keyslots within the ranges metadata.decode lets through (plus cheap KDF costs)."""
    key_size = draw(st.integers(1, 512))
    stripes = draw(st.integers(1, 64) | st.sampled_from([4000]) if key_size <= 64 else st.integers(1, 64))
    material = -(-key_size * stripes // 512) * 512
    area_size = draw(st.sampled_from([material, material + 4096, max(0, material - 512), 0]))
    return Keyslot(id=draw(st.integers(0, 31)), key_size=key_size, kdf=draw(kdfs),
                   af_stripes=stripes, af_hash=draw(st.sampled_from(AF_HASHES)),
                   area_offset=32768, area_size=area_size,
                   area_encryption=draw(st.sampled_from(["aes-xts-plain64", "aes-cbc-essiv:sha256",
                                                         "twofish-xts-plain64", ""])),
                   area_key_size=draw(st.sampled_from([32, 64, 16, 48, 1, 3, 512])))


@settings(max_examples=100, deadline=None)
@given(ks=keyslots(), seed=st.integers(0, 2**32), area_delta=st.sampled_from([0, 0, 512, -512, -1]),
       passphrase=st.binary(max_size=64))
def test_unwrap_random_keyslot(ks: Keyslot, seed: int, area_delta: int, passphrase: bytes) -> None:
    length = max(0, -(-ks.key_size * ks.af_stripes // 512) * 512 + area_delta)
    area = random.Random(seed).randbytes(length)
    with budget():
        try:
            key = keyslot.unwrap(ks, area, passphrase)
        except FormatError:
            return
        assert len(key) == ks.key_size


@settings(max_examples=10, deadline=None)
@given(volume_key=st.sampled_from([16, 32, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
       passphrase=st.binary(min_size=1, max_size=64))
def test_wrap_unwrap_round_trip(volume_key: bytes, passphrase: bytes) -> None:
    slot_json, area = keyslot.wrap(volume_key, passphrase, area_offset=2 * HDR)
    md_slot = metadata._keyslot(3, slot_json)
    assert md_slot is not None and md_slot.area_size == len(area)
    assert keyslot.unwrap(md_slot, area, passphrase) == volume_key
    digest = keyslot.make_digest(volume_key, [3], [0])
    parsed = metadata._digest(0, digest)
    keyslot.verify(parsed, volume_key)
    with pytest.raises(fmt.WrongKeyError):
        keyslot.verify(parsed, keyslot.unwrap(md_slot, area, passphrase + b"x"))
