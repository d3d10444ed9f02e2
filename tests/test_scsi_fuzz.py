"""gateway.scsi under random and mutated CDBs: never raises, never writes outside
the LUN or past the data buffer, always returns a well-formed result."""

from __future__ import annotations

import functools
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import format as fmt
from gateway.backstore import MemoryBackstore
from gateway.scsi import REGISTRY, BytesTransfer, Limits, LogicalUnit
from gateway.volume import State, Volume

OFFSET = fmt.MIN_DATA_OFFSET
SENSE_KEYS = {0x0, 0x2, 0x3, 0x5, 0x6, 0x7, 0xE}  # never 0x4: that is an internal error


class Source:
    def __init__(self, kek: bytes | None) -> None:
        self.kek = kek

    def request(self, volume: Volume, bindings: list[fmt.EvluToken]) -> None:
        if self.kek is not None:
            volume.offer_kek(bindings[0].key_id, self.kek)


@functools.cache
def unit(kind: str) -> tuple[LogicalUnit, MemoryBackstore]:
    """One logical unit per kind, shared by the examples (state carries over, as on a real LUN)."""
    limits = Limits(max_transfer_blocks=64, max_write_same_blocks=256, max_compare_write_blocks=4,
                    max_unmap_descriptors=4, max_unmap_blocks=512)
    if kind == "plain":
        store = MemoryBackstore(128 * 512)
        vol = Volume.open(store, allow_plain=True)
    else:
        store = MemoryBackstore(OFFSET + 128 * 4096)
        kek = os.urandom(32)
        fmt.create(store, kek, fmt.Binding("k1", "default"), sector_size=4096, data_offset=OFFSET)
        vol = Volume.open(store, key_source=Source(kek if kind == "encrypted" else None))
        if kind == "no_key":
            vol.refuse_key("k1", "refused")
    assert vol.state == {"plain": State.UNENCRYPTED, "encrypted": State.ENCRYPTED,
                         "waiting": State.WAITING_FOR_KEY, "no_key": State.NO_KEY}[kind]
    return LogicalUnit(vol, limits=limits), store


def _valid_cdbs() -> list[bytes]:
    """A plausible CDB for every command (near the start of the LUN)."""
    out = []
    for cmd in REGISTRY:
        cdb = bytearray(cmd.cdb_length)
        cdb[0] = cmd.opcode
        if cmd.service_action is not None:
            cdb[1] = cmd.service_action
        out.append(bytes(cdb))
    out += [struct.pack(">BBIBHB", op, 0, 3, 0, 2, 0) for op in (0x28, 0x2A, 0x2F, 0x41, 0x35)]
    out += [struct.pack(">BBQIBB", op, 0, 5, 3, 0, 0) for op in (0x88, 0x8A, 0x8F, 0x93, 0x91)]
    out += [struct.pack(">BBQ3xBBB", 0x89, 0, 2, 1, 0, 0), bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0)),
            bytes((0x12, 1, 0x83, 0, 255, 0)), bytes((0x1A, 0, 0x3F, 0, 255, 0)),
            bytes((0xA3, 0x0C, 0x81, 0x28, 0, 0, 0, 0, 1, 0, 0, 0))]
    return out


VALID = _valid_cdbs()
OPCODES = sorted({cmd.opcode for cmd in REGISTRY})


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    cdb = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(cdb) - 1))
        cdb[i] = draw(st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0x80, 0xFF])))
    if draw(st.integers(0, 9)) == 0:  # sometimes cut short
        del cdb[draw(st.integers(0, len(cdb))) :]
    return bytes(cdb)


cdbs = st.one_of(
    st.binary(max_size=32),
    st.builds(lambda op, rest: bytes((op,)) + rest, st.sampled_from(OPCODES), st.binary(max_size=31)),
    mutated(), mutated(),  # twice: most of the interesting paths start from a valid CDB
)


def _check(lu: LogicalUnit, cdb: bytes, length: int, contiguous: bool, seed: int,
           store: MemoryBackstore) -> None:
    data = random.Random(seed).randbytes(length)
    if seed % 3 == 0:  # often zeroes: unmap paths, and matching compares on fresh blocks
        data = bytes(length)
    xfer = BytesTransfer(data, length, contiguous=contiguous)
    before = store.data
    result = lu.execute(cdb, xfer)
    assert result.status in (0x00, 0x02), result
    assert 0 <= result.data_in_len <= xfer.length
    if result.status == 0x02:
        sense = result.sense
        assert len(sense) == 18 and sense[0] in (0x70, 0xF0) and sense[7] == 10, sense
        assert sense[2] in SENSE_KEYS, (cdb.hex(), sense.hex())
        if sense[12] == 0x24 and sense[15] & 0xC0 == 0xC0:  # SKSV, in the CDB
            cmd = REGISTRY.lookup(cdb)
            assert cmd is not None
            byte = int.from_bytes(sense[16:18], "big")
            mask = cmd.usage[byte] if byte < cmd.cdb_length else 0
            bit_mask = 1 << (sense[15] & 7) if sense[15] & 0x08 else 0xFF
            assert mask & bit_mask, f"{cmd.name}: refused byte {byte} is not in its usage data"
    else:
        assert result.sense == b""
    after = store.data
    state = lu.backend.state
    if state not in (State.ENCRYPTED, State.UNENCRYPTED) or result.status:
        assert after == before, f"{cdb.hex()} changed the store and failed"
    if lu.backend.header is not None:
        assert after[:OFFSET] == before[:OFFSET], "wrote outside the data segment"


@pytest.mark.parametrize("kind", ["plain", "encrypted", "waiting", "no_key"])
@settings(max_examples=250, deadline=None)
@given(cdb=cdbs, length=st.integers(0, 20000), contiguous=st.booleans(),
       seed=st.integers(0, 2**32))
def test_execute_never_misbehaves(kind, cdb, length, contiguous, seed):
    lu, store = unit(kind)
    _check(lu, cdb, length, contiguous, seed, store)
