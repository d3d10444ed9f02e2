"""The ``user:evlu`` handler: every TCMU device of the subtype, served from its eVLU.

On start it serves the devices that already exist (recovering rings a
previous handler left behind), then follows TCM-USER netlink events: a new
device is attached (backing store from the cfgstring, volume keyed through
the key source, SCSI logical unit, ring device), a removed one detached, a
reconfigured one rescanned.  Everything LIO knows about a device that the
logical unit needs (unit serial, max sectors, block size, write cache) is
read from its configfs directory; its capacity is LIO's ``dev_size`` (as
tcmu-runner's handlers do), at most what the backing store holds, and a
RECONFIG event's new ``dev_size`` or ``emulate_write_cache`` is applied from
the event itself (configfs shows the new value only after the event).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ..backstore import BackstoreError, open_backstore
from ..scsi import Identity, Limits, LogicalUnit
from ..volume import KeySource, Volume
from . import cfgstring
from .device import Executor, RingDevice
from .doorbell import UioDoorbell
from .netlink import Event, NetlinkError, NetlinkListener, set_reply_mode
from .ring import RingError
from .uio import CONFIGFS_CORE, SYSFS_UIO, Mapping, UioDevice, parse_name, read_device, \
    recover, scan

_log = logging.getLogger(__name__)
SERIAL_PREFIX = "T10 VPD Unit Serial Number:"


class VolumeSource(Protocol):
    """Where a device's volume comes from and goes back to (gatewayd shares its LUNs')."""

    def acquire(self, config: cfgstring.DeviceConfig, name: str) -> Volume:
        """The volume of ``config``'s backing store (BackstoreError if it cannot be opened)."""

    def release(self, volume: Volume, name: str) -> None:
        """The device ``name`` that ``acquire`` served is gone."""


class OwnVolumes:
    """Each device opens its own volume and closes it when detached."""

    def __init__(self, key_source: KeySource | None) -> None:
        self.key_source = key_source

    def acquire(self, config: cfgstring.DeviceConfig, name: str) -> Volume:
        return Volume.open(open_backstore(config.path), key_source=self.key_source,
                           allow_plain=config.allow_plain, name=name)

    def release(self, volume: Volume, name: str) -> None:
        volume.close()


@dataclass
class Served:
    """One device being served."""

    device: UioDevice
    volume: Volume
    lu: LogicalUnit
    mapping: Mapping
    ring: RingDevice


def _attr(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def dev_size_of(device: UioDevice, configfs: Path) -> int | None:
    """LIO's size of the device (attrib/dev_size), None if unknown."""
    size = _attr(device.configfs(configfs) / "attrib" / "dev_size")
    return int(size) if size.isdigit() and int(size) > 0 else None


def reconfigure(volume: Volume, lu: LogicalUnit, event: Event) -> str:
    """Apply a RECONFIG event's new value (the message carries it); says what changed.

    ``dev_size``: the new capacity, rescanning the backing store (which the
    admin grew first), so initiators see CAPACITY DATA HAS CHANGED;
    ``emulate_write_cache``: WCE in the caching mode page; ``dev_config``
    (another backing store under a served device) is not supported.
    """
    if event.dev_size is not None:
        transition = volume.limit_size(event.dev_size)
        served = volume.num_blocks * volume.block_size
        short = (f"; the backing store holds only {served} bytes"
                 if served < event.dev_size else "")
        return f"dev_size {event.dev_size}: serving {served} bytes " \
               f"({'changed' if transition else 'unchanged'}){short}"
    if event.writecache is not None:
        lu.limits = replace(lu.limits, write_cache=event.writecache)
        return f"write cache {'on' if event.writecache else 'off'}"
    if event.dev_cfg is not None:
        try:
            same = cfgstring.parse(event.dev_cfg).path == volume.backstore.path
        except ValueError:
            same = False
        if same:  # restoreconfig writes every attribute back
            return "dev_config unchanged"
        return f"dev_config {event.dev_cfg!r} ignored: remove the device and create it again"
    transition = volume.rescan()
    return f"rescanned ({transition or 'no change'})"


def identity_of(device: UioDevice, volume: Volume, configfs: Path) -> Identity:
    """The unit serial LIO assigned (wwn/vpd_unit_serial), else the volume UUID."""
    serial = _attr(device.configfs(configfs) / "wwn" / "vpd_unit_serial")
    if serial.startswith(SERIAL_PREFIX):
        serial = serial[len(SERIAL_PREFIX):].strip()
    if not serial and volume.header is not None:
        serial = volume.header.uuid
    return Identity(serial=serial)


def limits_of(device: UioDevice, volume: Volume, configfs: Path, data_area: int) -> Limits:
    """Transfer limits within hw_max_sectors and the ring's data area."""
    attrib = device.configfs(configfs) / "attrib"
    block = volume.block_size
    hw_block = int(_attr(attrib / "hw_block_size", str(block)) or block)
    hw_max = int(_attr(attrib / "hw_max_sectors", "128") or 128) * hw_block // block
    max_blocks = max(1, min(hw_max, data_area // block))
    cache = _attr(attrib / "emulate_write_cache", "1") != "0"
    # WRITE SAME is limited like a transfer: initiators (libiscsi's tests among them)
    # write MAXIMUM WRITE SAME LENGTH blocks with ordinary WRITEs too.
    return Limits(max_transfer_blocks=max_blocks, optimal_transfer_blocks=max_blocks,
                  max_write_same_blocks=max_blocks, write_cache=cache)


def _no_netlink_replies() -> None:
    """With no tcmu-runner beside us, the kernel is to wait for no netlink reply: a
    device made without ``nl_reply_supported=-1`` (stock targetcli, restoreconfig, a
    boot-time restore) would hang in enable once a tcmu-runner, gone since, had turned
    the module-wide switch on (rtslib's saveconfig drops the -1)."""
    try:
        set_reply_mode(False)
    except NetlinkError as exc:
        _log.error("could not switch TCM-USER netlink replies off (%s): a user:evlu device "
                   "created without nl_reply_supported=-1 may hang in enable", exc)


def least_used_cpu(allowed: Sequence[int], in_use: Iterable[int]) -> int:
    """Of ``allowed``, the CPU that appears least in ``in_use``; on a tie the highest
    (CPU 0 takes most interrupts and housekeeping)."""
    counts = collections.Counter(in_use)
    return min(allowed, key=lambda cpu: (counts[cpu], -cpu))


class Handler:
    """Serves every ``user:evlu`` device of this host."""

    def __init__(self, key_source: KeySource | None, *, workers: int = 4,
                 sysfs: Path = SYSFS_UIO, configfs: Path = CONFIGFS_CORE,
                 volumes: VolumeSource | None = None,
                 wrap: Callable[[str, LogicalUnit], Executor] | None = None,
                 beside_runner: bool = False, pin: bool = False) -> None:
        """``volumes``: where volumes come from (default: each device its own);
        ``wrap(so_name, lu)``: what the ring executes instead of ``lu`` (e.g. a meter);
        ``beside_runner``: a tcmu-runner serves other subtypes on this host;
        ``pin``: run each device's threads on one CPU, the one of this process's
        that serves the fewest devices (see :class:`RingDevice`: cheaper hand-offs,
        but a device's crypto no longer spreads over CPUs)."""
        self.key_source = key_source
        self.volumes = volumes or OwnVolumes(key_source)
        self.wrap = wrap
        self.workers = workers
        self.pin = pin
        self.beside_runner = beside_runner
        self.sysfs, self.configfs = sysfs, configfs
        self.served: dict[str, Served] = {}  # by uio name
        self._lock = threading.Lock()
        self._listener: NetlinkListener | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, *, listen: bool = True) -> Handler:
        """Serve existing devices, then (``listen``) follow netlink events in a thread."""
        if listen:
            self._listener = NetlinkListener()
            if not self.beside_runner:
                _no_netlink_replies()
        for device in scan(cfgstring.SUBTYPE, self.sysfs):
            self.attach(device)
        if self._listener is not None:
            self._thread = threading.Thread(target=self._listen, name="tcmu-netlink",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop following events and serving; in-flight commands get ``timeout``
        seconds in all to finish (then BUSY, see :meth:`RingDevice.stop`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        for served in list(self.served.values()):
            served.ring.request_stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        for name in list(self.served):
            self.detach(name, None if deadline is None else
                         max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _name(device: UioDevice) -> str:
        return f"tcm-user/{device.hba}/{device.so_name}/{device.subtype}/{device.cfgstring}"

    def attach(self, device: UioDevice) -> Served | None:
        """Serve ``device``; None (logged) when it cannot be served."""
        name = self._name(device)
        with self._lock:
            if name in self.served:
                return self.served[name]
            try:
                config = cfgstring.parse(device.cfgstring)
                volume = self.volumes.acquire(config, device.so_name)
            except (ValueError, BackstoreError) as exc:
                _log.error("%s: cannot serve %r: %s", device.so_name, device.cfgstring, exc)
                return None
            size = dev_size_of(device, self.configfs)
            if size is not None:  # LIO's size of the device: at most what it serves
                volume.limit_size(size)
            mapping = Mapping(device)
            try:
                if recover(device, mapping, self.configfs):
                    _log.warning("%s: ring reset (commands of a previous handler were "
                                 "failed back to the initiators)", device.so_name)
                ring_size = int.from_bytes(mapping.mem[8:12], "little")
                data_area = device.map_size - 128 - ring_size
                lu = LogicalUnit(volume, identity_of(device, volume, self.configfs),
                                 limits_of(device, volume, self.configfs, data_area))
                executor = self.wrap(device.so_name, lu) if self.wrap else lu
                ring = RingDevice(mapping.mem, UioDoorbell(mapping.fd), executor,
                                  workers=self.workers, name=device.so_name,
                                  cpus=self._cpu_for_next()).start()
            except (RingError, OSError, ValueError) as exc:
                _log.error("%s: cannot serve: %s", device.so_name, exc)
                mapping.close()
                self.volumes.release(volume, device.so_name)
                return None
            served = self.served[name] = Served(device, volume, lu, mapping, ring)
            _log.info("%s: serving %s (%s)%s", device.so_name, config.path, volume.state.value,
                      f" on CPU {min(ring.cpus)}" if ring.cpus else "")
            if size is not None and volume.num_blocks * volume.block_size < size:
                _log.warning("%s: LIO's dev_size is %d bytes but %s holds %d: serving those",
                             device.so_name, size, config.path,
                             volume.num_blocks * volume.block_size)
            return served

    def _cpu_for_next(self) -> set[int] | None:
        """The CPU for a new device's threads (see ``pin``); None with one CPU or none."""
        if not self.pin:
            return None
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return None
        in_use = [cpu for served in self.served.values() for cpu in served.ring.cpus or ()]
        return {least_used_cpu(allowed, in_use)}

    def detach(self, name: str, timeout: float | None = None) -> None:
        with self._lock:
            served = self.served.pop(name, None)
        if served is None:
            return
        if not served.ring.stop(timeout):
            # workers still hold the mapping and the volume: both go with the process
            _log.error("%s: detached with commands unfinished after %s s",
                       served.device.so_name, timeout)
            return
        served.mapping.close()
        self.volumes.release(served.volume, served.device.so_name)
        _log.info("%s: detached", served.device.so_name)

    def _listen(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(500):
                self._reap_gone()
                continue
            for event in self._listener.events():
                try:
                    self.handle(event)
                except Exception:  # noqa: BLE001 - one device's trouble never stops the others
                    _log.exception("TCM-USER event %s for %s failed", event.kind, event.device)

    def handle(self, event: Event) -> None:
        """Apply one netlink event."""
        parsed = parse_name(event.device)
        if parsed is None or parsed[2] != cfgstring.SUBTYPE:
            return
        if event.kind == "added" and event.minor is not None:
            device = read_device(self.sysfs / f"uio{event.minor}")
            if device is not None:
                self.attach(device)
        elif event.kind == "removed":
            self.detach(event.device)
        elif event.kind == "reconfig":
            served = self.served.get(event.device)
            if served is not None:
                _log.info("%s: reconfigured: %s", served.device.so_name,
                          reconfigure(served.volume, served.lu, event))

    def _reap_gone(self) -> None:
        for name, served in list(self.served.items()):
            if served.ring.gone:
                self.detach(name)
