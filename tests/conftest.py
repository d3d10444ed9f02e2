"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import format as fmt
from gateway.backstore import MemoryBackstore

SMALL = 4 << 20  # a small device with the minimum data offset


@pytest.fixture
def kek() -> bytes:
    return os.urandom(32)


@pytest.fixture
def small_evlu(kek: bytes) -> tuple[MemoryBackstore, fmt.Header, bytearray]:
    """A 4 MiB in-memory eVLU with the minimum data offset, bound to key 'k1'."""
    dev = MemoryBackstore(SMALL)
    header, dek = fmt.create(dev, kek, fmt.Binding("k1", "default"),
                             data_offset=fmt.MIN_DATA_OFFSET)
    return dev, header, dek


@pytest.fixture(scope="session")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator["KmsEnv"]:
    """One real embedded KMS for the session (gateways gw-a and gw-b enrolled)."""
    from kmsenv import KmsEnv
    env = KmsEnv(tmp_path_factory.mktemp("kms"))
    env.start()
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture
def own_kms(tmp_path: Path) -> Iterator["KmsEnv"]:
    """A real embedded KMS of the test's own, which the test may stop and restart."""
    from kmsenv import KmsEnv
    env = KmsEnv(tmp_path / "conf")
    env.start()
    try:
        yield env
    finally:
        env.stop()


#: lines for the terminal summary (e.g. how many crash cut points were exercised)
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if REPORT:
        terminalreporter.section("evlu test report")
        for line in REPORT:
            terminalreporter.write_line(line)
