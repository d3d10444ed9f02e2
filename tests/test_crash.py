"""Crash safety: a power cut (or a torn sector) at every write of every metadata
operation leaves either the old or the new consistent metadata, and the DEK
always recoverable while a binding exists."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conftest import REPORT
from faults import FaultyBackstore

from gateway import format as fmt
from gateway.backstore import BackstoreIOError, MemoryBackstore

SIZE = 2 << 20
OFFSET = fmt.MIN_DATA_OFFSET
KEKS = {name: os.urandom(32) for name in ("k1", "k2", "k3")}


@dataclass(frozen=True)
class Expect:
    """A consistent metadata state: its bindings (key id -> KEK name), or None for no header."""

    bindings: frozenset[str] | None


def _make(bindings: tuple[str, ...]) -> tuple[bytes, bytearray | None]:
    dev = MemoryBackstore(SIZE)
    if not bindings:
        dev.pwrite(os.urandom(64 << 10), 0)  # old contents of a plain device
        return dev.data, None
    header, dek = fmt.create(dev, KEKS[bindings[0]], fmt.Binding(bindings[0]), data_offset=OFFSET)
    for name in bindings[1:]:
        header = fmt.add_binding(dev, header, dek, KEKS[name], fmt.Binding(name))
    return dev.data, dek


def _state(dev: MemoryBackstore) -> tuple[Expect, bytes | None]:
    """Read the device as a gateway would after the crash: its bindings, and the
    one DEK that every binding must unlock."""
    try:
        result = fmt.read(dev)
    except fmt.NoHeaderError:
        return Expect(None), None
    header = result.header
    names = set()
    deks = set()
    for token in header.metadata.evlu_tokens():
        deks.add(bytes(fmt.unlock(dev, header, KEKS[token.key_id], token)))  # raises if lost
        names.add(token.key_id)
    assert len(deks) == 1, "bindings unlock different DEKs"
    if result.needs_repair:
        fmt.repair(dev, result)
        again = fmt.read(dev)
        assert not again.needs_repair and again.header.metadata.to_json() == header.metadata.to_json()
    return Expect(frozenset(names)), deks.pop()


Op = Callable[[MemoryBackstore | FaultyBackstore, bytearray | None], None]


def _header(dev: FaultyBackstore) -> fmt.Header:
    return fmt.read(dev).header


def _token(dev: FaultyBackstore, key_id: str) -> int:
    return next(t.id for t in _header(dev).metadata.evlu_tokens() if t.key_id == key_id)


#: operation -> (initial bindings, operation, acceptable old state(s), new state)
OPS: dict[str, tuple[tuple[str, ...], Op, Expect | tuple[Expect, ...], Expect]] = {
    "create": ((), lambda dev, dek: fmt.create(dev, KEKS["k1"], fmt.Binding("k1"),
                                               data_offset=OFFSET, force=True) and None,
               Expect(None), Expect(frozenset({"k1"}))),
    "create-over-existing": (("k2",), lambda dev, dek: fmt.create(
        dev, KEKS["k1"], fmt.Binding("k1"), data_offset=OFFSET, force=True) and None,
        # a forced re-format destroys the old header on purpose: erase, then create
        (Expect(frozenset({"k2"})), Expect(None)), Expect(frozenset({"k1"}))),
    "rotate": (("k1",), lambda dev, dek: fmt.rotate(dev, _header(dev), _token(dev, "k1"), dek,
                                                    KEKS["k2"], fmt.Binding("k2")) and None,
               Expect(frozenset({"k1"})), Expect(frozenset({"k2"}))),
    "add-binding": (("k1",), lambda dev, dek: fmt.add_binding(
        dev, _header(dev), dek, KEKS["k2"], fmt.Binding("k2")) and None,
        Expect(frozenset({"k1"})), Expect(frozenset({"k1", "k2"}))),
    "remove-binding": (("k1", "k2"), lambda dev, dek: fmt.remove_binding(
        dev, _header(dev), _token(dev, "k2")) and None,
        Expect(frozenset({"k1", "k2"})), Expect(frozenset({"k1"}))),
    "off": (("k1",), lambda dev, dek: fmt.erase(dev, _header(dev)),
            Expect(frozenset({"k1"})), Expect(None)),
}

TEAR_SEEDS = (1, 2, 3)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_cut_point(name: str) -> None:
    initial, dek = _make(OPS[name][0])
    _, op, old_states, new = OPS[name]
    olds = old_states if isinstance(old_states, tuple) else (old_states,)
    counter = FaultyBackstore(MemoryBackstore.from_bytes(initial), None)
    op(counter, dek)
    writes = counter.writes
    assert writes >= 3
    assert _state(counter.inner)[0] == new
    cuts = 0
    outcomes = {"old": 0, "new": 0}
    for n in range(1, writes + 1):
        for mode, seed in [("fail", 0)] + [("tear", s) for s in TEAR_SEEDS]:
            medium = MemoryBackstore.from_bytes(initial)
            faulty = FaultyBackstore(medium, n, mode, seed)  # type: ignore[arg-type]
            with pytest.raises(BackstoreIOError):
                op(faulty, dek)
            state, found = _state(medium)
            assert state in (*olds, new), f"{name}: cut at {n} ({mode}, seed {seed}) left {state}"
            if dek is not None and state.bindings and (state != new or name != "create-over-existing"):
                assert found == dek, f"{name}: cut at {n} ({mode}, seed {seed}) changed the DEK"
            outcomes["new" if state == new else "old"] += 1
            cuts += 1
    assert outcomes["old"] and outcomes["new"]
    REPORT.append(f"crash safety {name}: {writes} writes, {cuts} cut points "
                  f"({outcomes['old']} -> old, {outcomes['new']} -> new)")


def test_cut_during_repair() -> None:
    initial, dek = _make(("k1",))
    damaged = bytearray(initial)
    damaged[4096 + 20] ^= 0xFF  # primary JSON area
    counter = FaultyBackstore(MemoryBackstore.from_bytes(bytes(damaged)), None)
    fmt.repair(counter, fmt.read(counter))
    for n in range(1, counter.writes + 1):
        for mode, seed in [("fail", 0)] + [("tear", s) for s in TEAR_SEEDS]:
            medium = MemoryBackstore.from_bytes(bytes(damaged))
            faulty = FaultyBackstore(medium, n, mode, seed)  # type: ignore[arg-type]
            with pytest.raises(BackstoreIOError):
                fmt.repair(faulty, fmt.read(faulty))
            assert _state(medium) == (Expect(frozenset({"k1"})), bytes(dek))
    REPORT.append(f"crash safety repair: {counter.writes} writes, "
                  f"{counter.writes * (1 + len(TEAR_SEEDS))} cut points")
