"""TCMU devices as uio devices: find them in sysfs, map them, recover their rings.

``/sys/class/uio/uioN/name`` is ``tcm-user/<hba>/<so_name>/<subtype>/<cfgstring>``
(the cfgstring may itself contain '/'); ``maps/map0/size`` is the mapping size
in hex.  The device's configfs directory is
``/sys/kernel/config/target/core/user_<hba>/<so_name>``.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .ring import RingError

_log = logging.getLogger(__name__)

SYSFS_UIO = Path("/sys/class/uio")
CONFIGFS_CORE = Path("/sys/kernel/config/target/core")


@dataclass(frozen=True)
class UioDevice:
    """One ``tcm-user`` uio device."""

    minor: int
    hba: int
    so_name: str
    subtype: str
    cfgstring: str
    map_size: int

    @property
    def dev_path(self) -> Path:
        return Path(f"/dev/uio{self.minor}")

    def configfs(self, root: Path = CONFIGFS_CORE) -> Path:
        return root / f"user_{self.hba}" / self.so_name


def parse_name(name: str) -> tuple[int, str, str, str] | None:
    """(hba, so_name, subtype, cfgstring) of a ``tcm-user`` uio name, else None."""
    parts = name.strip().split("/", 4)
    if len(parts) < 4 or parts[0] != "tcm-user" or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2], parts[3], parts[4] if len(parts) > 4 else ""


def read_device(uio_dir: Path) -> UioDevice | None:
    """The tcm-user device behind ``/sys/class/uio/uioN``, or None for another driver."""
    match = re.fullmatch(r"uio(\d+)", uio_dir.name)
    if not match:
        return None
    try:
        parsed = parse_name((uio_dir / "name").read_text())
        size_text = (uio_dir / "maps" / "map0" / "size").read_text()
    except OSError:
        return None
    if parsed is None:
        return None
    return UioDevice(int(match.group(1)), *parsed, int(size_text.strip(), 16))


def scan(subtype: str, root: Path = SYSFS_UIO) -> list[UioDevice]:
    """Every tcm-user uio device of ``subtype``."""
    if not root.is_dir():
        return []
    found = (read_device(d) for d in sorted(root.iterdir()))
    return [d for d in found if d is not None and d.subtype == subtype]


class Mapping:
    """An open, mapped ``/dev/uioN`` (exclusive: a second open gets EBUSY)."""

    def __init__(self, device: UioDevice, dev_path: Path | None = None) -> None:
        path = dev_path or device.dev_path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.map = mmap.mmap(self.fd, device.map_size)
        except BaseException:
            os.close(self.fd)
            raise
        self.mem = memoryview(self.map)

    def close(self) -> None:
        """Close the device; unmap unless views of the ring are still held (a worker
        abandoned at a bounded stop, say): the mapping then goes with the last of them."""
        try:
            self.mem.release()
            self.map.close()
        except BufferError:
            _log.warning("ring mapping still in use: unmapped when its last user is done")
        os.close(self.fd)

    def pending(self) -> bool:
        """Whether the kernel has entries nobody completed (a previous handler died)."""
        words = self.mem[:128].cast("I")  # whole 4-byte loads: the kernel may be writing
        try:
            return bool(words[12 // 4] != words[64 // 4])
        finally:
            words.release()


def recover(device: UioDevice, mapping: Mapping, root: Path = CONFIGFS_CORE) -> bool:
    """After a handler restart: block the device, reset its ring, unblock it.

    In-flight commands are failed back to the initiators (which retry); the
    ring starts empty.  Returns whether a reset was needed.
    """
    if not mapping.pending():
        return False
    action = device.configfs(root) / "action"
    try:
        (action / "block_dev").write_text("1")
        (action / "reset_ring").write_text("1")
        (action / "block_dev").write_text("0")
    except OSError as exc:
        raise RingError(f"cannot reset the ring of {device.so_name}: {exc}") from exc
    return True
