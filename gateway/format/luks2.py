"""eVLU operations on a LUKS2 device: create, unlock, bind, unbind, rotate, erase.

Every mutation is ordered so that a crash at any write leaves either the old
or the new consistent metadata, and never a header whose keyslots cannot
recover the volume key:

* new keyslot material is written to an area no copy of the header uses,
  and flushed, before the header that references it is committed;
* a retired keyslot area is wiped only after the header that no longer
  references it is committed to both copies.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass

from . import binary, disk, keyslot
from .disk import Device, Header
from .errors import FormatError, HeaderExistsError, LayoutError, WrongKeyError
from .metadata import EVLU_TOKEN, MAX_KEYSLOTS_SIZE, MAX_SLOTS, EvluToken, Metadata

HDR_SIZE = 0x4000  # 16 KiB: 4 KiB binary header + 12 KiB JSON area, cryptsetup's default
DEK_SIZE = 64  # aes-xts-plain64 with AES-256: 512-bit volume key
KEYSLOT_AREA = keyslot.area_size(DEK_SIZE)  # 258048 bytes for 4000 stripes
MIN_KEYSLOTS = 4
#: smallest data offset with room for MIN_KEYSLOTS keyslots after both headers
MIN_DATA_OFFSET = 2 * HDR_SIZE + MIN_KEYSLOTS * KEYSLOT_AREA  # 1040 KiB
DEFAULT_DATA_OFFSET = 16 << 20
SEGMENT_ENCRYPTION = "aes-xts-plain64"
SUBSYSTEM = "evlu"
_ZERO_CHUNK = 1 << 20


@dataclass(frozen=True)
class Binding:
    """Where a keyslot's KEK lives: a key id in a named KMS profile."""

    key_id: str
    kms: str = "default"

    def __post_init__(self) -> None:
        if not self.key_id or not isinstance(self.key_id, str):
            raise FormatError("a binding needs a non-empty key id")
        if not isinstance(self.kms, str):
            raise FormatError("the KMS profile name must be a string")


def check_layout(size: int, sector_size: int, data_offset: int) -> None:
    """Validate a layout request with errors that say what to change."""
    if sector_size not in (512, 4096):
        raise LayoutError(f"sector size {sector_size} is not supported: use 512 or 4096")
    if data_offset < MIN_DATA_OFFSET:
        raise LayoutError(f"data offset {data_offset} is below the minimum {MIN_DATA_OFFSET} "
                          f"(room for {MIN_KEYSLOTS} keyslots)")
    if data_offset % 4096:
        raise LayoutError(f"data offset {data_offset} is not a multiple of 4096")
    if size < data_offset + sector_size:
        raise LayoutError(f"device is {size} bytes: too small for a data offset of {data_offset} "
                          f"plus one {sector_size}-byte sector; use a larger device or a "
                          "smaller --data-offset")


def create(dev: Device, kek: bytes, binding: Binding, *, sector_size: int = 512,
           data_offset: int = DEFAULT_DATA_OFFSET, force: bool = False,
           label: str = "", uuid: str | None = None) -> tuple[Header, bytearray]:
    """Format ``dev`` as an eVLU; returns the header and the new random DEK.

    ``uuid`` (default: a new random one) lets a caller name the KEK after the
    volume before the volume exists.

    Refuses to touch a device with any LUKS signature unless ``force``.
    """
    if not kek:
        raise FormatError("empty KEK")
    check_layout(dev.size, sector_size, data_offset)
    if disk.probe(dev):
        if not force:
            raise HeaderExistsError("the device already has a LUKS header; refusing to overwrite "
                                    "it (use --force to destroy it and everything it protects)")
        disk.erase(dev)
    for offset in range(0, data_offset, _ZERO_CHUNK):  # no stale metadata or keyslots
        dev.pwrite(bytes(min(_ZERO_CHUNK, data_offset - offset)), offset)
    dek = bytearray(os.urandom(DEK_SIZE))
    keyslots_size = min(data_offset - 2 * HDR_SIZE, MAX_KEYSLOTS_SIZE)
    slot_json, area = keyslot.wrap(dek, kek, area_offset=2 * HDR_SIZE)
    dev.pwrite(area, 2 * HDR_SIZE)
    dev.flush()
    obj = {
        "keyslots": {"0": slot_json},
        "tokens": {"0": _token_json(0, binding)},
        "segments": {"0": {"type": "crypt", "offset": str(data_offset), "size": "dynamic",
                           "iv_tweak": "0", "encryption": SEGMENT_ENCRYPTION,
                           "sector_size": sector_size}},
        "digests": {"0": keyslot.make_digest(dek, [0], [0])},
        "config": {"json_size": str(HDR_SIZE - binary.BINARY_SIZE),
                   "keyslots_size": str(keyslots_size)},
    }
    salt = os.urandom(64)
    volume_uuid = str(uuidlib.UUID(uuid) if uuid else uuidlib.uuid4())
    header = Header(hdr_size=HDR_SIZE, seqid=0, uuid=volume_uuid, label=label,
                    subsystem=SUBSYSTEM, salts=(salt, bytes(b ^ 0xFF for b in salt)),
                    metadata=Metadata(obj, HDR_SIZE))
    return disk.write(dev, header, fresh=True), dek


def _token_json(keyslot_id: int, binding: Binding) -> dict:
    return {"type": EVLU_TOKEN, "keyslots": [str(keyslot_id)], "key_id": binding.key_id,
            "kms": binding.kms}


def unlock_keyslot(dev: Device, header: Header, keyslot_id: int, kek: bytes) -> bytearray:
    """Recover and verify the DEK from one keyslot; :class:`WrongKeyError` if the KEK is wrong."""
    md = header.metadata
    ks = md.keyslots.get(keyslot_id)
    if ks is None:
        raise FormatError(f"keyslot {keyslot_id} does not exist")
    digest = md.digest_for_keyslot(keyslot_id)
    if md.data_segment.id not in digest.segments:
        raise FormatError(f"keyslot {keyslot_id} does not unlock the data segment")
    if dev.size < ks.area_offset + keyslot.material_length(ks):
        raise FormatError(f"keyslot {keyslot_id} area lies beyond the end of the device")
    dek = keyslot.unwrap(ks, dev.pread(keyslot.material_length(ks), ks.area_offset), kek)
    try:
        keyslot.verify(digest, dek)
    except WrongKeyError:
        dek[:] = bytes(len(dek))
        raise
    return dek


def unlock(dev: Device, header: Header, kek: bytes, token: EvluToken | None = None) -> bytearray:
    """The DEK, via ``token``'s keyslots, or else by trying every keyslot (as cryptsetup)."""
    if token is not None and not token.keyslots:
        raise FormatError(f"binding {token.key_id!r} has no keyslot (killed by luksKillSlot?)")
    candidates = token.keyslots if token is not None else sorted(header.metadata.keyslots)
    for keyslot_id in candidates:
        try:
            return unlock_keyslot(dev, header, keyslot_id, kek)
        except WrongKeyError:
            continue
    raise WrongKeyError("no keyslot opens with this key")


def _free_id(used: set[int] | dict) -> int:
    for i in range(MAX_SLOTS):
        if i not in used:
            return i
    raise LayoutError(f"all {MAX_SLOTS} slots are in use")


def _free_area(md: Metadata, size: int) -> int:
    start = 2 * md.hdr_size
    end = start + md.keyslots_size
    data = md.data_segment.offset
    taken = sorted(md.areas())
    pos = start
    for lo, hi in taken:
        if lo - pos >= size:
            break
        pos = max(pos, -(-hi // 4096) * 4096)
    if pos + size > min(end, data):
        raise LayoutError("no free keyslot area: remove a binding first, or reformat with a "
                          "larger data offset")
    return pos


def _prepare_slot(dev: Device, header: Header, dek: bytes, kek: bytes,
                  obj: dict) -> int:
    """Write a new keyslot's area and add it to ``obj``; returns its id."""
    md = header.metadata
    slot_id = _free_id(md.raw_keyslots)
    offset = _free_area(md, KEYSLOT_AREA)
    slot_json, area = keyslot.wrap(dek, kek, area_offset=offset)
    dev.pwrite(area, offset)
    dev.flush()
    obj["keyslots"][str(slot_id)] = slot_json
    digest_id = md.digest_for_segment(md.data_segment.id).id
    obj["digests"][str(digest_id)]["keyslots"].append(str(slot_id))
    return slot_id


def _drop_slot(obj: dict, slot_id: int) -> None:
    del obj["keyslots"][str(slot_id)]
    for dg in obj["digests"].values():
        if str(slot_id) in dg["keyslots"]:
            dg["keyslots"].remove(str(slot_id))


def _commit(dev: Device, header: Header, obj: dict) -> Header:
    return disk.write(dev, header.with_metadata(Metadata(obj, header.hdr_size)))


def _wipe_area(dev: Device, header: Header, slot_id: int) -> None:
    ks = header.metadata.keyslots[slot_id]
    dev.pwrite(os.urandom(ks.area_size), ks.area_offset)
    dev.flush()


def _check_dek(header: Header, dek: bytes) -> None:
    md = header.metadata
    keyslot.verify(md.digest_for_segment(md.data_segment.id), dek)


def add_binding(dev: Device, header: Header, dek: bytes, kek: bytes, binding: Binding) -> Header:
    """Wrap the DEK in a new keyslot under ``kek`` and bind it with a new token."""
    _check_dek(header, dek)
    obj = header.metadata.to_json()
    slot_id = _prepare_slot(dev, header, dek, kek, obj)
    obj["tokens"][str(_free_id(header.metadata.raw_tokens))] = _token_json(slot_id, binding)
    return _commit(dev, header, obj)


def _unused(obj: dict, slots: tuple[int, ...]) -> list[int]:
    """Those of ``slots`` no remaining token refers to."""
    used = {ks for t in obj["tokens"].values() for ks in t.get("keyslots", [])}
    return [s for s in slots if str(s) not in used]


def _retire(dev: Device, header: Header, obj: dict, slots: tuple[int, ...]) -> Header:
    """Commit ``obj`` without those of ``slots`` no token still uses, then wipe their areas."""
    retired = _unused(obj, slots)
    for slot_id in retired:
        _drop_slot(obj, slot_id)
    new = _commit(dev, header, obj)
    for slot_id in retired:
        _wipe_area(dev, header, slot_id)
    return new


def remove_binding(dev: Device, header: Header, token_id: int, *, allow_last: bool = False) -> Header:
    """Remove an evlu-kmip token and its keyslots; the last binding only if ``allow_last``."""
    md = header.metadata
    tokens = {t.id: t for t in md.evlu_tokens()}
    if token_id not in tokens:
        raise FormatError(f"token {token_id} is not an evlu-kmip binding")
    obj = md.to_json()
    del obj["tokens"][str(token_id)]
    retired = _unused(obj, tokens[token_id].keyslots)
    if not [ks for ks in md.keyslots if ks not in retired] and not allow_last:
        raise FormatError("refusing to remove the last binding: the data would become "
                          "unrecoverable (use 'evlu off' to remove encryption deliberately)")
    return _retire(dev, header, obj, tokens[token_id].keyslots)


def rotate(dev: Device, header: Header, token_id: int, dek: bytes, new_kek: bytes,
           binding: Binding) -> Header:
    """Re-wrap the DEK of one binding under a new KEK: one atomic header commit,
    no data rewrite.  The old keyslot area is wiped afterwards."""
    _check_dek(header, dek)
    md = header.metadata
    tokens = {t.id: t for t in md.evlu_tokens()}
    if token_id not in tokens:
        raise FormatError(f"token {token_id} is not an evlu-kmip binding")
    obj = md.to_json()
    slot_id = _prepare_slot(dev, header, dek, new_kek, obj)
    obj["tokens"][str(token_id)] = _token_json(slot_id, binding)
    return _retire(dev, header, obj, tokens[token_id].keyslots)


def erase(dev: Device, header: Header) -> None:
    """Remove the eVLU metadata: signatures first, then every keyslot area.

    Afterwards the device has no header (it reads as plain) and the old data
    is unrecoverable ciphertext."""
    disk.erase(dev)
    start = 2 * header.hdr_size
    end = min(start + header.metadata.keyslots_size, header.metadata.data_segment.offset)
    for offset in range(0, end, _ZERO_CHUNK):
        dev.pwrite(bytes(min(_ZERO_CHUNK, end - offset)), offset)
    dev.flush()
