"""The TCM-USER generic netlink family: device added/removed/reconfigured events.

Sans-IO codec (``encode_*``, :func:`parse`) plus :class:`NetlinkListener`, a
blocking socket that resolves the family, joins its ``config`` multicast
group and yields :class:`Event` objects.  We never reply to events: a device
created with ``nl_reply_supported=-1`` is never waited for, and
:meth:`NetlinkListener.set_reply_mode` (SET_FEATURES) turns the module-wide
reply mode that tcmu-runner switches on (and leaves on) off again.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_MCAST_GROUPS = 1, 2, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3
FAMILY = "TCM-USER"
GROUP = "config"

# TCM-USER commands and attributes (include/uapi/linux/target_core_user.h)
ADDED_DEVICE, REMOVED_DEVICE, RECONFIG_DEVICE, SET_FEATURES = 1, 2, 3, 7
ATTR_DEVICE, ATTR_MINOR, ATTR_DEV_CFG, ATTR_DEV_SIZE, ATTR_WRITECACHE = 1, 2, 4, 5, 6
ATTR_DEVICE_ID, ATTR_SUPP_KERN_CMD_REPLY = 8, 9
VERSION = 2
COMMANDS = {ADDED_DEVICE: "added", REMOVED_DEVICE: "removed", RECONFIG_DEVICE: "reconfig"}

_NLMSGHDR = struct.Struct("=IHHII")
_GENLHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")


class NetlinkError(OSError):
    """The family is missing (target_core_user not loaded) or the kernel said no."""


@dataclass(frozen=True)
class Message:
    """One generic netlink message: its family id, command and raw attributes."""

    family: int
    cmd: int
    attrs: dict[int, bytes]
    error: int = 0  # for NLMSG_ERROR: the negative errno (0 = ack)


@dataclass(frozen=True)
class Event:
    """A TCM-USER device event."""

    kind: str  # added, removed, reconfig
    device: str  # the uio name: tcm-user/<hba>/<name>/<subtype>/<cfgstring>
    minor: int | None = None  # /dev/uio<minor>
    dev_cfg: str | None = None  # RECONFIG: new dev_config
    dev_size: int | None = None  # RECONFIG: new size in bytes
    writecache: bool | None = None  # RECONFIG: emulate_write_cache
    device_id: int | None = None


def _align4(n: int) -> int:
    return (n + 3) & ~3


def encode_attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + bytes(_align4(length) - length)


def encode(family: int, cmd: int, attrs: bytes, *, seq: int = 0, version: int = 1,
           flags: int = NLM_F_REQUEST) -> bytes:
    body = _GENLHDR.pack(cmd, version, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, flags, seq, 0) + body


def encode_getfamily(name: str, seq: int = 1) -> bytes:
    return encode(GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                  encode_attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"), seq=seq)


def encode_set_features(family: int, reply: bool, seq: int = 2) -> bytes:
    """SET_FEATURES: whether the kernel waits for handlers' replies to device events."""
    return encode(family, SET_FEATURES, encode_attr(ATTR_SUPP_KERN_CMD_REPLY, bytes([reply])),
                  seq=seq, version=VERSION, flags=NLM_F_REQUEST | NLM_F_ACK)


def parse_attrs(data: bytes | memoryview) -> dict[int, bytes]:
    """Attributes by type (the last one wins); stops at a malformed attribute."""
    view = memoryview(data)
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _NLATTR.size <= len(view):
        length, kind = _NLATTR.unpack_from(view, pos)
        if length < _NLATTR.size or pos + length > len(view):
            break
        out[kind & 0x3FFF] = bytes(view[pos + _NLATTR.size:pos + length])  # drop NESTED/BYTEORDER
        pos += _align4(length)
    return out


def parse(data: bytes | memoryview) -> list[Message]:
    """Every message in one datagram; malformed tails are ignored."""
    view = memoryview(data)
    out: list[Message] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(view):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, pos)
        if length < _NLMSGHDR.size or pos + length > len(view):
            break
        body = view[pos + _NLMSGHDR.size:pos + length]
        if kind == NLMSG_ERROR and len(body) >= 4:
            out.append(Message(kind, 0, {}, struct.unpack_from("=i", body)[0]))
        elif kind != NLMSG_DONE and len(body) >= _GENLHDR.size:
            cmd = _GENLHDR.unpack_from(body)[0]
            out.append(Message(kind, cmd, parse_attrs(body[_GENLHDR.size:])))
        pos += _align4(length)
    return out


def family_info(msg: Message) -> tuple[int, dict[str, int]]:
    """(family id, {multicast group name: id}) from a CTRL_CMD_NEWFAMILY answer."""
    if CTRL_ATTR_FAMILY_ID not in msg.attrs:
        raise NetlinkError("generic netlink answer without a family id")
    family = struct.unpack("=H", msg.attrs[CTRL_ATTR_FAMILY_ID][:2])[0]
    groups: dict[str, int] = {}
    for nested in parse_attrs(msg.attrs.get(CTRL_ATTR_MCAST_GROUPS, b"")).values():
        group = parse_attrs(nested)
        if CTRL_ATTR_MCAST_GRP_NAME in group and CTRL_ATTR_MCAST_GRP_ID in group:
            name = group[CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()
            groups[name] = struct.unpack("=I", group[CTRL_ATTR_MCAST_GRP_ID][:4])[0]
    return family, groups


def _string(raw: bytes | None) -> str | None:
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


def _uint(raw: bytes | None, fmt: str) -> int | None:
    if raw is None or len(raw) < struct.calcsize(fmt):
        return None
    return int(struct.unpack_from(fmt, raw)[0])


def to_event(msg: Message) -> Event | None:
    """The device event a TCM-USER message carries (None for other commands)."""
    kind = COMMANDS.get(msg.cmd)
    device = _string(msg.attrs.get(ATTR_DEVICE))
    if kind is None or device is None:
        return None
    cache = _uint(msg.attrs.get(ATTR_WRITECACHE), "=B")
    return Event(kind, device, _uint(msg.attrs.get(ATTR_MINOR), "=I"),
                 _string(msg.attrs.get(ATTR_DEV_CFG)), _uint(msg.attrs.get(ATTR_DEV_SIZE), "=Q"),
                 None if cache is None else bool(cache), _uint(msg.attrs.get(ATTR_DEVICE_ID), "=I"))


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_GENERIC)
    sock.bind((0, 0))
    return sock


def _acked(sock: socket.socket, what: str, hint: str = "") -> list[Message]:
    """Read one answer; raise NetlinkError if it is an error."""
    messages = parse(sock.recv(65536))
    for msg in messages:
        if msg.family == NLMSG_ERROR and msg.error:
            raise NetlinkError(-msg.error, f"{what}: {os.strerror(-msg.error)}{hint}")
    return messages


def resolve(sock: socket.socket, name: str) -> tuple[int, dict[str, int]]:
    """(family id, multicast groups) of a generic netlink family."""
    sock.sendto(encode_getfamily(name), (0, 0))
    hint = " (is target_core_user loaded?)" if name == FAMILY else ""
    for msg in _acked(sock, f"generic netlink family {name}", hint):
        if msg.family == GENL_ID_CTRL:
            return family_info(msg)
    raise NetlinkError(f"no answer resolving generic netlink family {name}")


def set_reply_mode(reply: bool) -> None:
    """TCM-USER SET_FEATURES (needs CAP_NET_ADMIN), on a socket of its own.

    Module-wide, for devices enabled from then on: with ``reply=False`` the
    kernel waits for nobody's reply, so a device created without
    ``nl_reply_supported=-1`` (stock targetcli, restoreconfig) cannot hang in
    ``enable``.  tcmu-runner sends ``reply=True`` when it starts.
    """
    with _socket() as sock:
        family, _groups = resolve(sock, FAMILY)
        sock.sendto(encode_set_features(family, reply), (0, 0))
        if not any(m.family == NLMSG_ERROR for m in _acked(sock, "TCM-USER SET_FEATURES")):
            raise NetlinkError("no acknowledgement of TCM-USER SET_FEATURES")


class NetlinkListener:
    """A generic netlink socket subscribed to TCM-USER's ``config`` group."""

    def __init__(self, family_name: str = FAMILY, group: str = GROUP) -> None:
        self.sock = _socket()
        try:
            self.family, groups = self.resolve(family_name)
            if group not in groups:
                raise NetlinkError(f"generic netlink family {family_name} has no group {group!r}")
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups[group])
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def resolve(self, name: str) -> tuple[int, dict[str, int]]:
        return resolve(self.sock, name)

    def events(self) -> Iterator[Event]:
        """Block for the next datagram and yield its TCM-USER events."""
        for msg in parse(self.sock.recv(65536)):
            if msg.family == self.family:
                event = to_event(msg)
                if event is not None:
                    yield event
