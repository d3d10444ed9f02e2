"""TCM-USER netlink messages and uio discovery (sysfs and configfs laid out in a directory).

The real TCM-USER family exists only where target_core_user is loaded (the
appliance VM tier); here the codec is checked on kernel-format bytes and the
listener's family resolution on the host kernel's own generic netlink.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.backstore import open_backstore
from gateway.scsi import Identity, Limits, LogicalUnit
from gateway.tcmu import netlink as nl
from gateway.tcmu import uio
from gateway.tcmu.handler import Handler, dev_size_of, least_used_cpu, limits_of, reconfigure
from gateway.tcmu.simkernel import SimKernel
from gateway.volume import Volume


def kernel_event(cmd: int, attrs: bytes, family: int = 0x1A) -> bytes:
    """A message laid out as the kernel's genlmsg_multicast sends it."""
    return nl.encode(family, cmd, attrs, version=2, flags=0)


def test_added_event_is_parsed() -> None:
    name = b"tcm-user/3/lun0/evlu//var/lib/evlu/lun0.img;plain\0"
    data = kernel_event(nl.ADDED_DEVICE, nl.encode_attr(nl.ATTR_DEVICE, name)
                        + nl.encode_attr(nl.ATTR_MINOR, struct.pack("=I", 7))
                        + nl.encode_attr(nl.ATTR_DEVICE_ID, struct.pack("=I", 99)))
    (msg,) = nl.parse(data)
    assert nl.to_event(msg) == nl.Event("added", name[:-1].decode(), 7, device_id=99)


def test_reconfig_events_carry_the_new_value() -> None:
    dev = nl.encode_attr(nl.ATTR_DEVICE, b"tcm-user/0/x/evlu//a\0")
    size = kernel_event(nl.RECONFIG_DEVICE, dev + nl.encode_attr(nl.ATTR_DEV_SIZE,
                                                                   struct.pack("=Q", 1 << 30)))
    cache = kernel_event(nl.RECONFIG_DEVICE, dev + nl.encode_attr(nl.ATTR_WRITECACHE, b"\1"))
    (a,), (b,) = nl.parse(size), nl.parse(cache)
    assert nl.to_event(a).dev_size == 1 << 30  # type: ignore[union-attr]
    assert nl.to_event(b).writecache is True  # type: ignore[union-attr]


def test_two_messages_in_one_datagram_and_garbage() -> None:
    dev = nl.encode_attr(nl.ATTR_DEVICE, b"tcm-user/0/x/evlu//a\0")
    data = kernel_event(nl.ADDED_DEVICE, dev) + kernel_event(nl.REMOVED_DEVICE, dev)
    assert [nl.to_event(m).kind for m in nl.parse(data)] == ["added", "removed"]  # type: ignore
    assert nl.parse(b"\xff" * 7) == []
    assert nl.parse(struct.pack("=IHHII", 1000, 0x1A, 0, 0, 0) + bytes(20)) == []
    assert nl.to_event(nl.Message(0x1A, 99, {})) is None
    # A truncated attribute stops parsing instead of reading past the message.
    assert nl.parse_attrs(struct.pack("=HH", 200, 1) + b"abc") == {}


def test_family_answer_with_groups() -> None:
    group = nl.encode_attr(nl.CTRL_ATTR_MCAST_GRP_NAME, b"config\0") + \
        nl.encode_attr(nl.CTRL_ATTR_MCAST_GRP_ID, struct.pack("=I", 12))
    attrs = nl.encode_attr(nl.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 0x1A)) + \
        nl.encode_attr(nl.CTRL_ATTR_MCAST_GROUPS, nl.encode_attr(1, group))
    (msg,) = nl.parse(nl.encode(nl.GENL_ID_CTRL, 1, attrs))
    assert nl.family_info(msg) == (0x1A, {"config": 12})


def test_resolution_against_the_host_kernel() -> None:
    listener = nl.NetlinkListener.__new__(nl.NetlinkListener)
    import socket
    listener.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_GENERIC)
    try:
        listener.sock.bind((0, 0))
        family, groups = listener.resolve("nlctrl")
        assert family == nl.GENL_ID_CTRL and "notify" in groups
    finally:
        listener.sock.close()
    if not Path("/sys/module/target_core_user").exists():
        with pytest.raises(nl.NetlinkError, match="target_core_user"):
            nl.NetlinkListener()


def make_uio(root: Path, minor: int, name: str, size: int) -> None:
    d = root / f"uio{minor}"
    (d / "maps" / "map0").mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "maps" / "map0" / "size").write_text(f"0x{size:016x}\n")


def test_scan_finds_our_devices_only(tmp_path: Path) -> None:
    make_uio(tmp_path, 0, "tcm-user/1/lun0/evlu//srv/a.img", 0x40800000)
    make_uio(tmp_path, 1, "tcm-user/1/qcow0/qcow//srv/b.qcow2", 0x40800000)
    make_uio(tmp_path, 2, "uio_pci_generic", 4096)
    make_uio(tmp_path, 3, "tcm-user/2/lun1/evlu//srv/c.img;plain", 0x1000)
    found = uio.scan("evlu", tmp_path)
    assert [(d.minor, d.hba, d.so_name, d.cfgstring, d.map_size) for d in found] == [
        (0, 1, "lun0", "/srv/a.img", 0x40800000), (3, 2, "lun1", "/srv/c.img;plain", 0x1000)]
    assert found[0].configfs(Path("/cfg")) == Path("/cfg/user_1/lun0")
    assert uio.scan("evlu", tmp_path / "missing") == []


def test_mapping_and_ring_recovery(tmp_path: Path) -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    try:
        device = uio.UioDevice(0, 1, "lun0", "evlu", "/srv/a.img", k.size)
        mapping = uio.Mapping(device, Path(f"/proc/self/fd/{k.memfd}"))
        configfs = tmp_path / "core"
        action = device.configfs(configfs) / "action"
        action.mkdir(parents=True)
        try:
            assert not uio.recover(device, mapping, configfs)  # idle ring: nothing to do
            k.queue(bytes([0x00] * 6))  # a command the dead handler never completed
            assert uio.recover(device, mapping, configfs)
            assert (action / "block_dev").read_text() == "0"
            assert (action / "reset_ring").read_text() == "1"
        finally:
            mapping.close()
    finally:
        k.close()


def test_mapping_closes_while_a_view_of_the_ring_is_held() -> None:
    k = SimKernel(cmdr_size=4096, data_size=64 << 10)
    try:
        device = uio.UioDevice(0, 1, "lun0", "evlu", "/srv/a.img", k.size)
        mapping = uio.Mapping(device, Path(f"/proc/self/fd/{k.memfd}"))
        held = mapping.mem[128:256]  # e.g. a worker's view of a data iovec
        mapping.close()  # no BufferError: detaching a device must never fail
        with pytest.raises(OSError):
            os.fstat(mapping.fd)
        assert bytes(held) == bytes(k.mem[128:256])  # still mapped while held
        held.release()
    finally:
        k.close()


def test_set_features_switches_the_reply_mode() -> None:
    (msg,) = nl.parse(nl.encode_set_features(0x1A, False))
    assert (msg.family, msg.cmd, msg.attrs) == (0x1A, nl.SET_FEATURES,
                                               {nl.ATTR_SUPP_KERN_CMD_REPLY: b"\0"})
    flags = struct.unpack_from("=H", nl.encode_set_features(0x1A, True), 6)[0]
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK  # the kernel's ack tells EPERM apart


def reconfig(**values: object) -> nl.Event:
    return nl.Event("reconfig", "tcm-user/1/lun0/evlu//srv/a.img;plain", 0, **values)  # type: ignore


def test_reconfig_serves_the_size_the_event_carries(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    path.write_bytes(bytes(1 << 20))
    volume = Volume.open(open_backstore(str(path)), allow_plain=True, size_limit=1 << 20)
    lu = LogicalUnit(volume, Identity(serial="x"), Limits())
    try:
        assert volume.num_blocks == 2048
        os.truncate(path, 4 << 20)  # the admin grows the backing file, then dev_size
        assert volume.num_blocks == 2048  # nothing changes before the event
        said = reconfigure(volume, lu, reconfig(dev_size=3 << 20))
        assert volume.num_blocks == 6144 and "changed" in said
        assert lu.take_unit_attention() == (0x2A, 0x09)  # CAPACITY DATA HAS CHANGED
        said = reconfigure(volume, lu, reconfig(dev_size=8 << 20))  # more than the file
        assert volume.num_blocks == 8192 and "holds only 4194304" in said
        reconfigure(volume, lu, reconfig(writecache=False))
        assert lu.limits.write_cache is False
        assert "ignored" in reconfigure(volume, lu, reconfig(dev_cfg="evlu//srv/b.img"))
        assert reconfigure(volume, lu, reconfig(dev_cfg=f"evlu/{path};plain")) == \
            "dev_config unchanged"
        assert volume.num_blocks == 8192
    finally:
        volume.close()


def test_dev_size_is_read_from_configfs(tmp_path: Path) -> None:
    device = uio.UioDevice(0, 1, "lun0", "evlu", "/srv/a.img", 4096)
    attrib = device.configfs(tmp_path) / "attrib"
    assert dev_size_of(device, tmp_path) is None
    attrib.mkdir(parents=True)
    (attrib / "dev_size").write_text("67108864\n")
    assert dev_size_of(device, tmp_path) == 64 << 20


def test_limits_follow_lios_attributes(tmp_path: Path) -> None:
    """WCE follows the backstore's emulate_write_cache; a transfer stays within both
    hw_max_sectors and the ring's data area."""
    path = tmp_path / "lun.img"
    path.write_bytes(bytes(1 << 20))
    volume = Volume.open(open_backstore(str(path)), allow_plain=True)
    device = uio.UioDevice(0, 1, "lun0", "evlu", str(path), 4096)
    attrib = device.configfs(tmp_path) / "attrib"
    attrib.mkdir(parents=True)
    try:
        for value, cache in (("0", False), ("1", True)):
            (attrib / "emulate_write_cache").write_text(f"{value}\n")
            (attrib / "hw_max_sectors").write_text("2048\n")
            limits = limits_of(device, volume, tmp_path, data_area=8 << 20)
            assert limits.write_cache is cache
            assert limits.max_transfer_blocks == 2048
        assert limits_of(device, volume, tmp_path, data_area=64 << 10).max_transfer_blocks == 128
    finally:
        volume.close()


def test_devices_spread_over_the_least_used_cpus() -> None:
    assert least_used_cpu([0, 1, 2, 3], []) == 3  # ties: the highest, away from CPU 0
    assert least_used_cpu([0, 1, 2, 3], [3, 2, 3]) == 1  # the highest of those unused
    assert least_used_cpu([0, 1], [0, 1, 1]) == 0
    assert least_used_cpu([2, 5], [5, 5, 2, 9]) == 2  # CPUs no longer allowed do not count
    placed: list[int] = []
    for _ in range(7):
        placed.append(least_used_cpu([1, 3, 6], placed))
    assert placed == [6, 3, 1, 6, 3, 1, 6]


def test_the_handler_pins_new_devices_only_when_asked() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert Handler(None)._cpu_for_next() is None  # the default: the scheduler places them
    pinned = Handler(None, pin=True)
    if len(allowed) < 2:
        assert pinned._cpu_for_next() is None  # nothing to choose between
        return
    first = pinned._cpu_for_next()
    assert first == {allowed[-1]}
    pinned.served["a"] = SimpleNamespace(ring=SimpleNamespace(cpus=first))  # type: ignore[assignment]
    assert pinned._cpu_for_next() == {allowed[-2]}
