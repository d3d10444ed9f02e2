"""Backstores on real files and loop devices, MemoryBackstore parity, and FaultyBackstore.

Needs root (losetup, mount, chattr); a missing tool or privilege fails the
test with the reason instead of skipping it.
"""

from __future__ import annotations

import array
import errno
import os
import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.backstore import (
    Backstore,
    BackstoreError,
    BackstoreIOError,
    BackstoreNotFoundError,
    BackstorePermissionError,
    BlockBackstore,
    FileBackstore,
    MemoryBackstore,
    ShortDeviceError,
    WouldBlock,
    open_backstore,
)
from gateway.backstore import block as block_mod
from gateway.backstore import file as file_mod
from gateway.backstore.base import error_from_oserror
from faults import FaultyBackstore
from pagecache import refused_once_evicted

KiB = 1 << 10
MiB = 1 << 20
LoopFactory = Callable[..., tuple[str, Path]]


def run(*cmd: str) -> str:
    """Run a command; fail the test (never skip) if it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except OSError as exc:
        pytest.fail(f"cannot run {cmd[0]}: {exc}")
    if done.returncode:
        pytest.fail(f"{' '.join(cmd)} failed with status {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def pattern(length: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(length)


def fd_flags(path: str | Path) -> int:
    """open(2) flags of this process's only descriptor on ``path``, from /proc/self/fdinfo."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(path):
            with open(f"/proc/self/fdinfo/{fd}") as info:
                return next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
    pytest.fail(f"no open descriptor on {path}")


@pytest.fixture
def loop_factory(tmp_path: Path) -> Iterator[LoopFactory]:
    """make(content, size, readonly, sector_size) -> (loop device, backing file); detached afterwards."""
    devices: list[str] = []

    def make(
        content: bytes = b"", size: int = 8 * MiB, readonly: bool = False, sector_size: int = 512
    ) -> tuple[str, Path]:
        image = tmp_path / f"loop{len(devices)}.img"
        image.write_bytes(content)
        os.truncate(image, max(size, len(content)))
        options = ["-r"] if readonly else []
        device = run("losetup", *options, "-b", str(sector_size), "-f", "--show", str(image))
        devices.append(device)
        return device, image

    yield make
    failures = []
    for device in devices:
        done = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
        if done.returncode:
            failures.append(f"losetup -d {device}: {done.stderr.strip()}")
    if failures:
        pytest.fail("; ".join(failures))


KINDS = ["memory", "file", "block"]


@pytest.fixture(params=KINDS)
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, loop_factory: LoopFactory
) -> Iterator[Callable[..., Backstore]]:
    """make(content, readonly) -> a backstore of each kind holding ``content``."""
    opened: list[Backstore] = []

    def make(content: bytes, readonly: bool = False) -> Backstore:
        if request.param == "memory":
            store: Backstore = MemoryBackstore.from_bytes(content, readonly=readonly)
        elif request.param == "file":
            path = tmp_path / f"store{len(opened)}.img"
            path.write_bytes(content)
            store = open_backstore(str(path), readonly=readonly)
        else:
            device, _ = loop_factory(content, size=len(content))
            store = open_backstore(device, readonly=readonly)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# --- semantics shared by memory, file and loop-device backstores -----------------------------------


def test_size_and_block_size(make_store: Callable[..., Backstore]) -> None:
    store = make_store(pattern(64 * KiB))
    assert store.size == 64 * KiB
    assert store.logical_block_size == 512
    assert store.refresh_size() == 64 * KiB


def test_round_trip(make_store: Callable[..., Backstore]) -> None:
    old = pattern(64 * KiB, seed=1)
    store = make_store(old)
    new = pattern(5000, seed=2)
    store.pwrite(new, 1000)
    store.pwrite(bytearray(b"ab"), 0)
    store.pwrite(memoryview(b"xyz")[1:], 64 * KiB - 2)
    store.pwrite(array.array("I", [0x01020304]), 8000)
    expected = bytearray(old)
    expected[1000:6000] = new
    expected[0:2] = b"ab"
    expected[-2:] = b"yz"
    expected[8000:8004] = array.array("I", [0x01020304]).tobytes()
    assert store.pread(64 * KiB, 0) == expected
    assert store.pread(100, 999) == expected[999:1099]
    buf = bytearray(3000)
    store.preadinto(buf, 2000)
    assert buf == expected[2000:5000]
    numbers = array.array("H", bytes(10))
    store.preadinto(numbers, 1000)
    assert numbers.tobytes() == new[:10]
    assert store.pread(0, 64 * KiB) == b""
    store.flush()


def test_access_past_end_is_refused(make_store: Callable[..., Backstore]) -> None:
    old = pattern(16 * KiB)
    store = make_store(old)
    for length, offset in [(1, 16 * KiB), (2, 16 * KiB - 1), (4096, 14 * KiB), (0, 16 * KiB + 1)]:
        with pytest.raises(ShortDeviceError, match=f"{store.path}.*{16 * KiB} bytes"):
            store.pread(length, offset)
        with pytest.raises(ShortDeviceError):
            store.preadinto(bytearray(length), offset)
        with pytest.raises(ShortDeviceError):
            store.pwrite(b"\xff" * length, offset)
        with pytest.raises(ShortDeviceError):
            store.write_zeroes(offset, length)
        with pytest.raises(ShortDeviceError):
            store.discard(offset, length)
    assert store.size == 16 * KiB
    assert store.refresh_size() == 16 * KiB
    assert store.pread(16 * KiB, 0) == old
    with pytest.raises(ValueError):
        store.pread(-1, 0)
    with pytest.raises(ValueError):
        store.pwrite(b"x", -1)


def test_readonly_refuses_writes(make_store: Callable[..., Backstore]) -> None:
    old = pattern(8 * KiB)
    store = make_store(old, readonly=True)
    assert store.readonly
    for write in (lambda: store.pwrite(b"x" * 512, 0), lambda: store.discard(0, 512),
                  lambda: store.write_zeroes(0, 512)):
        with pytest.raises(BackstorePermissionError, match="read-only") as info:
            write()
        assert info.value.errno == errno.EROFS and info.value.path == store.path
    assert store.pread(8 * KiB, 0) == old
    store.flush()


def test_closed_store_refuses_everything(make_store: Callable[..., Backstore]) -> None:
    store = make_store(pattern(4 * KiB))
    with store as entered:
        assert entered is store
    assert store.closed
    store.close()
    uses: list[Callable[[], object]] = [
        lambda: store.size, lambda: store.logical_block_size, store.refresh_size, store.flush,
        lambda: store.pread(1, 0), lambda: store.preadinto(bytearray(1), 0), lambda: store.pwrite(b"x", 0),
        lambda: store.discard(0, 512), lambda: store.write_zeroes(0, 512), lambda: store.__enter__(),
    ]
    for use in uses:
        with pytest.raises(BackstoreError, match="closed: open it again"):
            use()


def test_write_zeroes_and_discard_read_back_zeroes(make_store: Callable[..., Backstore]) -> None:
    old = pattern(256 * KiB)
    store = make_store(old)
    expected = bytearray(old)
    for offset, length in [(4 * KiB, 64 * KiB), (100, 1000), (200 * KiB + 7, 3 * KiB), (0, 512)]:
        store.write_zeroes(offset, length)
        expected[offset : offset + length] = bytes(length)
    store.discard(128 * KiB, 32 * KiB)  # block-aligned: a loop device punches a hole in its file
    expected[128 * KiB : 160 * KiB] = bytes(32 * KiB)
    assert store.pread(len(old), 0) == expected
    assert store.size == len(old)


# --- MemoryBackstore behaves like FileBackstore -----------------------------------------------------

_offsets = st.integers(0, 6000)
_lengths = st.integers(0, 1500)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("pwrite"), _offsets, st.binary(max_size=1500)),
        st.tuples(st.sampled_from(["pread", "preadinto", "discard", "write_zeroes"]), _offsets, _lengths),
        st.tuples(st.sampled_from(["flush", "refresh_size"]), st.just(0), st.just(0)),
    ),
    max_size=25,
)


def _apply(store: Backstore, op: tuple[str, int, object]) -> object:
    name, offset, arg = op
    try:
        if name == "pwrite":
            return store.pwrite(arg, offset)  # type: ignore[arg-type]
        if name == "pread":
            return store.pread(arg, offset)  # type: ignore[arg-type]
        if name == "preadinto":
            buf = bytearray(arg)  # type: ignore[call-overload]
            store.preadinto(buf, offset)
            return bytes(buf)
        if name in ("discard", "write_zeroes"):
            return getattr(store, name)(offset, arg)
        return getattr(store, name)()
    except BackstoreError as exc:
        return type(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=5000), ops=_ops)
def test_memory_and_faulty_match_file(
    tmp_path: Path, content: bytes, ops: list[tuple[str, int, object]]
) -> None:
    path = tmp_path / "parity.img"
    path.write_bytes(content)
    memory = MemoryBackstore.from_bytes(content)
    faulty = FaultyBackstore(MemoryBackstore.from_bytes(content), None)
    with open_backstore(str(path)) as file, faulty:
        for op in ops:
            outcome = _apply(file, op)
            assert _apply(memory, op) == outcome, op
            assert _apply(faulty, op) == outcome, op
        assert memory.size == file.size == faulty.size == len(content)
        assert memory.data == file.pread(file.size, 0) == faulty.pread(faulty.size, 0)
    assert path.read_bytes() == memory.data


# --- regular files -------------------------------------------------------------------------------


def test_open_backstore_picks_the_class(tmp_path: Path, loop_factory: LoopFactory) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(4096))
    link = tmp_path / "link"
    link.symlink_to(path)
    device, _ = loop_factory()
    with open_backstore(str(path)) as a, open_backstore(str(link)) as b, open_backstore(device) as c:
        assert type(a) is FileBackstore and type(b) is FileBackstore and type(c) is BlockBackstore
        assert a.path == str(path) and c.path == device
    with pytest.raises(BackstoreError, match="is a block device: give a regular file"):
        FileBackstore(device)
    with pytest.raises(BackstoreError, match="is a regular file: give a block device"):
        BlockBackstore(str(path))


def test_failed_write_never_extends_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    old = pattern(10_000)
    path.write_bytes(old)
    with open_backstore(str(path)) as store:
        for offset in (10_000, 9_999, 20_000):
            with pytest.raises(ShortDeviceError):
                store.pwrite(b"x" * 2, offset)
        store.pwrite(b"end", 9_997)
    assert os.stat(path).st_size == 10_000
    assert path.read_bytes() == old[:9_997] + b"end"


def test_data_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(8192))
    with open_backstore(str(path)) as store:
        store.pwrite(b"persist", 4000)
        store.flush()
    with open_backstore(str(path), readonly=True) as store:
        assert store.pread(7, 4000) == b"persist"
        assert fd_flags(path) & os.O_ACCMODE == os.O_RDONLY


def test_refresh_size_follows_truncate(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(pattern(8192))
    with open_backstore(str(path)) as store:
        os.truncate(path, 16384)
        assert store.size == 8192
        with pytest.raises(ShortDeviceError):
            store.pread(1, 8192)
        assert store.refresh_size() == 16384 and store.size == 16384
        assert store.pread(8192, 8192) == bytes(8192)
        os.truncate(path, 4096)
        with pytest.raises(ShortDeviceError, match="shrank"):  # stale size: the read hits the real end
            store.pread(1000, 4000)
        assert store.refresh_size() == 4096
        with pytest.raises(ShortDeviceError):
            store.pwrite(b"x", 4096)
    assert os.stat(path).st_size == 4096


def test_write_zeroes_punches_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(pattern(4 * MiB))
    os.sync()
    with open_backstore(str(path)) as store:
        before = os.stat(path).st_blocks
        store.write_zeroes(MiB, 2 * MiB)
        store.flush()
        assert os.stat(path).st_blocks <= before - (2 * MiB) // 512
        assert store.pread(2 * MiB, MiB) == bytes(2 * MiB)
    assert os.stat(path).st_size == 4 * MiB


def test_allocation_reports_the_files_holes(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    with open_backstore(str(path)) as store:
        assert store.allocation(0, 4 * MiB) == (False, 4 * MiB)
        store.pwrite(pattern(64 * KiB), MiB)
        assert store.allocation(0, 4 * MiB) == (False, MiB)
        assert store.allocation(512, 1000) == (False, 1000)  # never past the range asked
        assert store.allocation(MiB, 3 * MiB) == (True, 64 * KiB)
        assert store.allocation(MiB + 4 * KiB, 512) == (True, 512)
        assert store.allocation(MiB + 64 * KiB, 3 * MiB - 64 * KiB) == (False, 3 * MiB - 64 * KiB)
        store.write_zeroes(MiB, 32 * KiB)  # punched: a hole again
        assert store.allocation(MiB, 3 * MiB) == (False, 32 * KiB)
        with pytest.raises(ShortDeviceError):
            store.allocation(4 * MiB, 512)
        with pytest.raises(ValueError):
            store.allocation(0, 0)
    with open_backstore(str(path)) as again:  # nothing cached: the file says
        assert again.allocation(MiB + 32 * KiB, MiB) == (True, 32 * KiB)


def test_a_store_that_cannot_tell_reports_all_allocated() -> None:
    store = MemoryBackstore(MiB)
    assert store.allocation(0, MiB) == (True, MiB)
    assert store.allocation(MiB - 512, 512) == (True, 512)


def test_without_punch_hole_write_zeroes_writes_and_discard_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(file_mod, "punch_hole", unsupported)
    path = tmp_path / "f.img"
    old = pattern(3 * MiB)
    path.write_bytes(old)
    with open_backstore(str(path)) as store:
        store.discard(0, MiB)  # only a hint: silently nothing
        assert store.pread(MiB, 0) == old[:MiB]
        store.write_zeroes(100, 2 * MiB + 5)
        assert store.pread(3 * MiB, 0) == old[:100] + bytes(2 * MiB + 5) + old[2 * MiB + 105 :]


def test_punch_hole_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(file_mod, "punch_hole", broken)
    path = tmp_path / "f.img"
    path.write_bytes(bytes(4096))
    with open_backstore(str(path)) as store:
        with pytest.raises(BackstoreIOError, match="dmesg") as info:
            store.write_zeroes(0, 4096)
    assert info.value.errno == errno.EIO


def test_short_transfers_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv, real_pread, real_pwrite = os.preadv, os.pread, os.pwrite
    calls = {"preadv": 0, "pwrite": 0}

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["preadv"] += 1
        return real_preadv(fd, [buffers[0][:7]], offset)

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls["pwrite"] += 1
        return real_pwrite(fd, data[:5], offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pread", lambda fd, length, offset: real_pread(fd, min(length, 3), offset))
    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "f.img"
    path.write_bytes(bytes(1000))
    data = pattern(100)
    with open_backstore(str(path)) as store:
        store.pwrite(data, 50)
        assert calls["pwrite"] == 20
        assert store.pread(100, 50) == data
        buf = bytearray(100)
        store.preadinto(buf, 50)
        assert buf == data
        assert calls["preadv"] >= 15


def test_zero_progress_and_io_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(1000))
    with open_backstore(str(path)) as store:
        monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
        with pytest.raises(BackstoreIOError, match="short write"):
            store.pwrite(b"abc", 0)
        monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 0)
        with pytest.raises(ShortDeviceError):
            store.preadinto(bytearray(10), 0)

        def eio(*args: object) -> int:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        for name in ("pread", "preadv", "pwrite", "fdatasync"):
            monkeypatch.setattr(os, name, eio)
        for use in (lambda: store.pread(10, 0), lambda: store.preadinto(bytearray(10), 0),
                    lambda: store.pwrite(b"x", 0), store.flush):
            expected = f"{path}: Input/output error: the medium reported an I/O error"
            with pytest.raises(BackstoreIOError, match=expected) as info:
                use()
            assert info.value.errno == errno.EIO and info.value.path == str(path)


# --- opening errors ----------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(BackstoreNotFoundError, match="check the path") as info:
        open_backstore(str(missing))
    assert info.value.errno == errno.ENOENT and info.value.path == str(missing)
    assert str(missing) in str(info.value)
    assert not missing.exists()
    with pytest.raises(BackstoreNotFoundError):
        FileBackstore(str(missing))


def test_unsupported_file_types(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [(str(tmp_path), "a directory"), ("/dev/null", "a character device"), (str(fifo), "a FIFO")]
    for path, what in cases:
        with pytest.raises(BackstoreError, match=f"is {what}: give a regular file or a block device") as info:
            open_backstore(path, readonly=True)
        assert type(info.value) is BackstoreError and info.value.path == path


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ENOENT, BackstoreNotFoundError),
        (errno.ENXIO, BackstoreNotFoundError),
        (errno.EACCES, BackstorePermissionError),
        (errno.EPERM, BackstorePermissionError),
        (errno.EROFS, BackstorePermissionError),
        (errno.EIO, BackstoreIOError),
        (errno.ENOSPC, BackstoreIOError),
        (errno.EDQUOT, BackstoreIOError),
        (errno.ENOMEM, BackstoreIOError),
    ],
)
def test_errno_mapping(code: int, cls: type[BackstoreError]) -> None:
    exc = OSError(code, os.strerror(code))
    error = error_from_oserror(exc, "/srv/lun0.img", "write 512 bytes at offset 0 of")
    assert type(error) is cls and error.errno == code and error.path == "/srv/lun0.img"
    message = str(error)
    assert message.startswith(f"cannot write 512 bytes at offset 0 of /srv/lun0.img: {os.strerror(code)}: ")
    assert len(message.rsplit(": ", 1)[1]) > 10  # ends with advice


def test_immutable_file_gives_eperm(tmp_path: Path) -> None:
    path = tmp_path / "immutable.img"
    path.write_bytes(b"keep" * 1024)
    run("chattr", "+i", str(path))
    try:
        with pytest.raises(BackstorePermissionError, match="immutable") as info:
            open_backstore(str(path))
        assert info.value.errno == errno.EPERM
        with open_backstore(str(path), readonly=True) as store:
            assert store.pread(4, 0) == b"keep"
    finally:
        run("chattr", "-i", str(path))


def test_read_only_filesystem_gives_erofs(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m", "evlu-test", str(mount))
    try:
        path = mount / "lun.img"
        path.write_bytes(b"ro" * 2048)
        run("mount", "-o", "remount,ro", str(mount))
        with pytest.raises(BackstorePermissionError, match="read-only filesystem") as info:
            open_backstore(str(path))
        assert info.value.errno == errno.EROFS
        with open_backstore(str(path), readonly=True) as store:
            assert store.pread(2, 4094) == b"ro"
    finally:
        run("umount", str(mount))


# --- loop devices ------------------------------------------------------------------------------------


def test_ioctl_numbers_match_linux_fs_h() -> None:
    # values printed by a C program including <linux/fs.h> on x86_64 (asm-generic ioctl layout)
    assert block_mod.BLKROGET == 0x125E
    assert block_mod.BLKSSZGET == 0x1268
    assert block_mod.BLKGETSIZE64 == (0x80081272 if os.sysconf("SC_LONG_BIT") == 64 else 0x80041272)
    assert block_mod.BLKDISCARD == 0x1277
    assert block_mod.BLKZEROOUT == 0x127F


def test_loop_device_size_and_sector_size(loop_factory: LoopFactory) -> None:
    device, _ = loop_factory(size=6 * MiB, sector_size=4096)
    with open_backstore(device) as store:
        assert store.size == 6 * MiB
        assert store.logical_block_size == 4096
        assert int(run("blockdev", "--getss", device)) == 4096


def test_loop_device_round_trip_reaches_backing_file(loop_factory: LoopFactory) -> None:
    device, image = loop_factory(size=MiB)
    data = pattern(12345)
    with open_backstore(device) as store:
        store.pwrite(data, 4096)
        store.flush()
    with open(image, "rb") as backing:
        backing.seek(4096)
        assert backing.read(len(data)) == data


def test_loop_device_refresh_size(loop_factory: LoopFactory) -> None:
    device, image = loop_factory(size=MiB)
    with open_backstore(device) as store:
        os.truncate(image, 3 * MiB)
        run("losetup", "-c", device)
        assert store.size == MiB
        assert store.refresh_size() == 3 * MiB
        store.pwrite(b"grown", 3 * MiB - 5)
        assert store.pread(5, 3 * MiB - 5) == b"grown"


def test_read_only_loop_device(loop_factory: LoopFactory) -> None:
    device, _ = loop_factory(b"ro-device", size=MiB, readonly=True)
    with pytest.raises(BackstorePermissionError, match="read-only block device") as info:
        open_backstore(device)
    assert info.value.errno == errno.EROFS and info.value.path == device
    with open_backstore(device, readonly=True) as store:
        assert store.pread(9, 0) == b"ro-device"


def _spy_ioctl(monkeypatch: pytest.MonkeyPatch, fail: dict[int, int]) -> list[tuple[int, int, int]]:
    """Record BLKDISCARD/BLKZEROOUT calls; make the requests in ``fail`` raise that errno."""
    real = block_mod.fcntl.ioctl
    seen: list[tuple[int, int, int]] = []

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        if request in (block_mod.BLKDISCARD, block_mod.BLKZEROOUT):
            start, length = int.from_bytes(arg[:8], "little"), int.from_bytes(arg[8:], "little")
            seen.append((request, start, length))
            if request in fail:
                raise OSError(fail[request], os.strerror(fail[request]))
        return real(fd, request, arg)

    monkeypatch.setattr(block_mod.fcntl, "ioctl", ioctl)
    return seen


def test_loop_device_uses_blkzeroout_and_blkdiscard(
    loop_factory: LoopFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = pattern(MiB)
    device, _ = loop_factory(old, size=MiB, sector_size=4096)
    seen = _spy_ioctl(monkeypatch, {})
    with open_backstore(device) as store:
        store.write_zeroes(100, 20_000)  # unaligned ends are written, the middle is zeroed by ioctl
        store.discard(40_000, 100_000)  # only the aligned middle is discarded
        assert seen == [(block_mod.BLKZEROOUT, 4096, 12288), (block_mod.BLKDISCARD, 40960, 98304)]
        data = store.pread(MiB, 0)
    assert data[:100] == old[:100] and data[20_100:40_000] == old[20_100:40_000]
    assert data[100:20_100] == bytes(20_000)
    assert data[40960:139264] == bytes(98304)  # a loop device discards by punching a hole
    assert data[140_000:] == old[140_000:]


def test_loop_device_without_blkzeroout_writes_zeroes(
    loop_factory: LoopFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = pattern(MiB)
    device, _ = loop_factory(old, size=MiB)
    unsupported = {block_mod.BLKZEROOUT: errno.EOPNOTSUPP, block_mod.BLKDISCARD: errno.EOPNOTSUPP}
    seen = _spy_ioctl(monkeypatch, unsupported)
    with open_backstore(device) as store:
        store.write_zeroes(4096, 512 * KiB)
        store.discard(0, 4096)  # unsupported: silently nothing
        assert len(seen) == 2
        assert store.pread(MiB, 0) == old[:4096] + bytes(512 * KiB) + old[4096 + 512 * KiB :]


# --- O_DIRECT ---------------------------------------------------------------------------------------


def _check_direct(store: Backstore, path: str) -> None:
    block = store.logical_block_size
    assert fd_flags(path) & os.O_DIRECT
    big = pattern(3 * MiB + block, seed=7)  # larger than the bounce buffer: several chunks
    store.pwrite(big, block)
    assert store.pread(len(big), block) == big
    buf = bytearray(2 * block)
    store.preadinto(buf, block)
    assert buf == big[: 2 * block]
    store.write_zeroes(2 * block, block)
    store.discard(8 * block, block)
    store.flush()
    expected = bytearray(big)
    expected[block : 2 * block] = bytes(block)
    expected[7 * block : 8 * block] = bytes(block)
    assert store.pread(len(big), block) == expected
    refused: list[Callable[[], object]] = [
        lambda: store.pread(block, 1), lambda: store.pread(block - 1, 0), lambda: store.pread(block // 2, 0),
        lambda: store.preadinto(bytearray(100), 0), lambda: store.pwrite(b"x" * block, block + 512 // 2),
        lambda: store.pwrite(b"x" * 10, 0), lambda: store.write_zeroes(0, 100),
        lambda: store.discard(3, block),
    ]
    for use in refused:
        with pytest.raises(BackstoreError, match=f"multiples of {block} bytes") as info:
            use()
        assert type(info.value) is BackstoreError and info.value.errno == errno.EINVAL


def test_direct_io_on_file(tmp_path: Path) -> None:
    path = tmp_path / "direct.img"
    path.write_bytes(bytes(5 * MiB))
    with open_backstore(str(path), direct=True) as store:
        _check_direct(store, str(path))
    with open_backstore(str(path)) as store:
        assert fd_flags(path) & os.O_DIRECT == 0
        assert store.pread(512, 0) == bytes(512)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_direct_io_on_loop_device(loop_factory: LoopFactory, sector_size: int) -> None:
    device, _ = loop_factory(size=8 * MiB, sector_size=sector_size)
    with open_backstore(device, direct=True) as store:
        assert store.logical_block_size == sector_size
        _check_direct(store, device)


def test_nowait_read_takes_the_page_cache_or_refuses(tmp_path: Path) -> None:
    """A read asked not to wait returns cached data, and refuses (WouldBlock) data the
    kernel would have to fetch from the disk: evicted pages, or any O_DIRECT read."""
    path = tmp_path / "cached.img"
    data = pattern(4 * MiB, seed=7)
    path.write_bytes(data)
    with open_backstore(str(path)) as store:
        buf = bytearray(64 * 1024)
        store.preadinto(buf, MiB, nowait=True)  # just written: in the page cache
        assert buf == data[MiB:MiB + len(buf)]
        store.flush()
        refused_once_evicted(path, lambda: store.preadinto(buf, 2 * MiB, nowait=True))
        store.preadinto(buf, 2 * MiB)  # the waiting read fetches it...
        assert buf == data[2 * MiB:2 * MiB + len(buf)]
        store.preadinto(buf, 2 * MiB, nowait=True)  # ...and now it is at hand
        assert buf == data[2 * MiB:2 * MiB + len(buf)]
        with pytest.raises(ShortDeviceError):  # range checks come first
            store.preadinto(buf, 4 * MiB, nowait=True)
    with open_backstore(str(path), direct=True) as store:
        with pytest.raises(WouldBlock):
            store.preadinto(bytearray(4096), 0, nowait=True)
    memory = MemoryBackstore.from_bytes(data)
    buf = bytearray(4096)
    memory.preadinto(buf, 8192, nowait=True)
    assert buf == data[8192:8192 + 4096]


def test_direct_io_from_many_threads(tmp_path: Path) -> None:
    path = tmp_path / "direct.img"
    path.write_bytes(bytes(16 * MiB))
    chunks = [pattern(2 * MiB, seed=n) for n in range(8)]
    with open_backstore(str(path), direct=True) as store:
        def work(n: int) -> None:
            for _ in range(3):
                store.pwrite(chunks[n], n * 2 * MiB)
                assert store.pread(2 * MiB, n * 2 * MiB) == chunks[n]

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert path.read_bytes() == b"".join(chunks)


# --- FaultyBackstore -----------------------------------------------------------------------------------


def _four_writes(store: Backstore) -> None:
    store.pwrite(b"\x01" * 1024, 0)
    store.write_zeroes(2048, 1024)
    store.flush()
    store.pwrite(b"\x03" * 1024, 4096)
    store.discard(6144, 512)


def test_faulty_counts_writes_only() -> None:
    faulty = FaultyBackstore(MemoryBackstore.from_bytes(b"\xee" * 8192), None)
    _four_writes(faulty)
    faulty.pread(100, 0)
    faulty.preadinto(bytearray(10), 0)
    faulty.pwrite(b"", 0)
    faulty.write_zeroes(0, 0)
    assert faulty.writes == 4 and not faulty.cut


def test_faulty_fail_cuts_power_at_each_write() -> None:
    counter = FaultyBackstore(MemoryBackstore.from_bytes(b"\xee" * 8192), None)
    _four_writes(counter)
    complete = counter.inner.pread(8192, 0)
    expected_after = [bytearray(b"\xee" * 8192)]
    writes = [(0, b"\x01" * 1024), (2048, bytes(1024)), (4096, b"\x03" * 1024), (6144, bytes(512))]
    for offset, data in writes:
        expected_after.append(bytearray(expected_after[-1]))
        expected_after[-1][offset : offset + len(data)] = data
    assert expected_after[-1] == complete
    for n in range(1, counter.writes + 1):
        inner = MemoryBackstore.from_bytes(b"\xee" * 8192)
        faulty = FaultyBackstore(inner, n, "fail")
        with pytest.raises(BackstoreIOError, match=f"power cut at write #{n}") as info:
            _four_writes(faulty)
        assert info.value.errno == errno.EIO
        assert faulty.writes == n and faulty.cut and faulty.torn is None
        assert inner.data == expected_after[n - 1]
        assert faulty.pread(8192, 0) == expected_after[n - 1]
        for later in (lambda: faulty.pwrite(b"z", 0), lambda: faulty.write_zeroes(0, 1), faulty.flush):
            with pytest.raises(BackstoreIOError):
                later()
        assert inner.data == expected_after[n - 1]


def _torn(seed: int, mode_write: str = "pwrite") -> tuple[FaultyBackstore, bytes, bytes]:
    old = b"\xaa" * 8 * 512
    inner = MemoryBackstore.from_bytes(old + b"\xbb" * 512)
    faulty = FaultyBackstore(inner, 1, "tear", seed=seed)
    new = pattern(8 * 512, seed=seed) if mode_write == "pwrite" else bytes(8 * 512)
    with pytest.raises(BackstoreIOError):
        if mode_write == "pwrite":
            faulty.pwrite(new, 0)
        else:
            faulty.write_zeroes(0, 8 * 512)
    return faulty, old, new


def test_faulty_tear_stores_whole_sectors_then_half_a_sector() -> None:
    sector_counts = set()
    for seed in range(40):
        faulty, old, new = _torn(seed)
        assert faulty.torn is not None
        offset, stored = faulty.torn
        k, half = divmod(stored, 512)
        assert offset == 0 and half == 256 and 0 <= k < 8
        sector_counts.add(k)
        assert faulty.inner.pread(9 * 512, 0) == new[:stored] + old[stored:] + b"\xbb" * 512
        assert _torn(seed)[0].torn == faulty.torn  # deterministic
        with pytest.raises(BackstoreIOError):
            faulty.pwrite(b"late", 4096)
        assert faulty.inner.pread(4, 4096) == b"\xbb" * 4
    assert 0 in sector_counts and len(sector_counts) >= 5


def test_faulty_tear_of_zeroes_and_of_short_writes() -> None:
    faulty, old, _ = _torn(3, "write_zeroes")
    assert faulty.torn is not None
    stored = faulty.torn[1]
    assert faulty.inner.pread(8 * 512, 0) == bytes(stored) + old[stored:]
    inner = MemoryBackstore.from_bytes(b"\xaa" * 1024)
    faulty = FaultyBackstore(inner, 2, "tear")
    faulty.pwrite(b"\x01" * 100, 0)
    with pytest.raises(BackstoreIOError):
        faulty.pwrite(b"\x02" * 100, 200)  # one partial sector: half of it lands
    assert inner.data == b"\x01" * 100 + b"\xaa" * 100 + b"\x02" * 50 + b"\xaa" * 774


def test_faulty_tear_over_a_file(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(b"\xaa" * 8192)
    with open_backstore(str(path)) as inner:
        faulty = FaultyBackstore(inner, 1, "tear", seed=5)
        with pytest.raises(BackstoreIOError):
            faulty.pwrite(b"\x55" * 8192, 0)
        faulty.close()
        assert not inner.closed
        assert faulty.torn is not None
        stored = faulty.torn[1]
    assert path.read_bytes() == b"\x55" * stored + b"\xaa" * (8192 - stored)


def test_faulty_rejects_bad_arguments() -> None:
    inner = MemoryBackstore(512)
    with pytest.raises(ValueError):
        FaultyBackstore(inner, 0)
    with pytest.raises(ValueError):
        FaultyBackstore(inner, 1, "explode")  # type: ignore[arg-type]


def test_memory_backstore_constructors() -> None:
    assert MemoryBackstore(1000).data == bytes(1000)
    store = MemoryBackstore.from_bytes(memoryview(b"abc"), readonly=True)
    assert store.data == b"abc" and store.readonly and store.size == 3
    store.close()
    assert store.data == b"abc"
    with pytest.raises(ValueError):
        MemoryBackstore(-1)
