"""Interop with the real cryptsetup (2.6.x), in both directions, on plain files.

* Headers we write are read, dumped and unlocked by ``cryptsetup`` (luksDump,
  ``open --test-passphrase`` with the KEK or the volume key, token export).
* Devices ``cryptsetup luksFormat`` made (argon2/pbkdf2, 512/4096-byte
  sectors, 64 KiB metadata, AES-128-XTS, ``--offset``) are read and unlocked by
  our reader, and changes cryptsetup makes to our headers (token import and
  remove, luksAddKey, luksKillSlot) are seen by it.
* The data area: what :class:`Volume` writes equals an independent per-sector
  AES-XTS computation with dm-crypt plain64 IVs, and the other way round.

There is no device-mapper here, so nothing is activated: ``open
--test-passphrase`` checks keys, and the data area is checked with the
independent cipher.  A missing ``cryptsetup`` FAILS these tests (never skips).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway import format as fmt
from gateway.backstore import Backstore, open_backstore
from gateway.format import disk
from gateway.volume import State, Volume

KiB = 1 << 10
MiB = 1 << 20
TiB = 1 << 40

# Fast KDF parameters for everything cryptsetup makes (its defaults benchmark for 2 s).
FAST_PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
FAST_ARGON2ID = ("--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4",
                 "--pbkdf-parallel", "2")
FAST_ARGON2I = ("--pbkdf", "argon2i", "--pbkdf-memory", "16384", "--pbkdf-force-iterations", "4",
                "--pbkdf-parallel", "1")
# cryptsetup's exit status for "No key available with this passphrase" / "Volume key does not match"
EXIT_NO_PERMISSION = 2


# -- running cryptsetup --------------------------------------------------------------------------

def cryptsetup_binary() -> str:
    path = shutil.which("cryptsetup") or next(
        (p for p in ("/usr/sbin/cryptsetup", "/sbin/cryptsetup") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail("cryptsetup is not installed: the LUKS2 interop tests need it "
                    "(Debian: apt-get install cryptsetup-bin)")
    return path


def cs(*args: str | Path, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run cryptsetup; with ``check`` a non-zero exit fails the test with its stderr."""
    cmd = [cryptsetup_binary(), *map(str, args)]
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} timed out")
    if check and done.returncode:
        pytest.fail(f"{' '.join(cmd)} failed with status {done.returncode}: "
                    f"{(done.stderr or done.stdout).strip()}")
    return done


def cs_json(path: Path) -> dict:
    """The LUKS2 JSON metadata as cryptsetup parsed it."""
    return json.loads(cs("luksDump", "--dump-json-metadata", path).stdout)


def cs_dump(path: Path) -> str:
    """``cryptsetup luksDump``, insisting that cryptsetup found BOTH header copies valid.

    luksDump silently repairs a bad copy, so a plain exit status would hide a
    header of ours that cryptsetup considers damaged: the debug log must show
    two checksums, each on-disk value equal to the recomputed one, and no
    recovery.  Returns the normal (non-debug) output.
    """
    done = cs("--debug", "luksDump", path)
    log = done.stdout + done.stderr
    bad = [line for line in log.splitlines()
           if re.search(r"checksum error|requires recovery|recovery failed|seqid mismatch|"
                        r"not a valid LUKS|Repairing|Header mismatch", line, re.I)]
    assert not bad, f"cryptsetup did not accept both header copies of {path}: {bad}"
    sums = re.findall(r"Checksum:([0-9a-f]+) \((on-disk|in-memory)\)", log)
    assert len(sums) == 4, f"expected two header copies with checksums in the debug log: {sums}"
    for (disk_sum, a), (mem_sum, b) in zip(sums[0::2], sums[1::2]):
        assert (a, b) == ("on-disk", "in-memory") and disk_sum == mem_sum
    return "\n".join(line for line in log.splitlines() if not line.startswith("# "))


def check_passphrase(path: Path, key_file: Path, *extra: str) -> int:
    """Exit status of ``cryptsetup open --test-passphrase --key-file``."""
    return cs("open", "--test-passphrase", "--key-file", key_file, *extra, path, check=False).returncode


def check_volume_key(path: Path, vk_file: Path, key_bits: int = 512) -> int:
    """Exit status of ``cryptsetup open --test-passphrase --volume-key-file``."""
    return cs("open", "--test-passphrase", "--key-size", str(key_bits), "--volume-key-file", vk_file,
              path, check=False).returncode


def dump_field(dump: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}:\s*(.*)$", dump, re.M)
    assert match, f"no {name!r} in luksDump output:\n{dump}"
    return match.group(1).strip()


# -- files, keys and our own devices ----------------------------------------------------------------

def key_file(tmp_path: Path, name: str, size: int = 32) -> tuple[bytes, Path]:
    """A random binary key (it may contain newlines: key files are read verbatim)."""
    key = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(key)
    return key, path


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        try:
            f.truncate(size)
        except OSError as exc:
            pytest.fail(f"cannot make a {size}-byte sparse file in {path.parent}: {exc}")
    return path


@contextmanager
def store(path: Path) -> Iterator[Backstore]:
    backstore = open_backstore(str(path))
    try:
        yield backstore
    finally:
        backstore.close()


def read_header(path: Path) -> fmt.Header:
    with store(path) as dev:
        return fmt.read(dev).header


@dataclass
class Evlu:
    path: Path
    kek: bytes
    kek_file: Path
    dek: bytes
    dek_file: Path
    header: fmt.Header


def make_evlu(tmp_path: Path, *, sector_size: int = 512, data_offset: int = fmt.MIN_DATA_OFFSET,
              size: int | None = None, key_id: str = "kmip-uid-1", kms: str = "prod",
              label: str = "") -> Evlu:
    path = sparse_file(tmp_path / "evlu.img", size or data_offset + 1 * MiB)
    kek, kek_file = key_file(tmp_path, "kek")
    with store(path) as dev:
        header, dek = fmt.create(dev, kek, fmt.Binding(key_id, kms), sector_size=sector_size,
                                 data_offset=data_offset, label=label)
    dek_file = tmp_path / "dek"
    dek_file.write_bytes(dek)
    return Evlu(path, kek, kek_file, bytes(dek), dek_file, header)


def evlu_token(key_id: str, kms: str, keyslot: int) -> dict:
    return {"type": "evlu-kmip", "keyslots": [str(keyslot)], "key_id": key_id, "kms": kms}


# -- the independent data-area cipher --------------------------------------------------------------

def plain64_xts(key: bytes, data: bytes, first_sector: int, sector_size: int, iv_tweak: int,
                *, encrypt: bool) -> bytes:
    """dm-crypt aes-xts-plain64, one cryptography call per sector.

    The IV is the little-endian 64-bit sector number counted in 512-byte units
    (LUKS2 sets no iv_large_sectors), plus iv_tweak, zero-padded to 16 bytes.
    """
    assert len(data) % sector_size == 0
    out = bytearray()
    for i in range(0, len(data), sector_size):
        iv = ((first_sector + i // sector_size) * (sector_size // 512) + iv_tweak) % 2**64
        cipher = Cipher(algorithms.AES(key), modes.XTS(iv.to_bytes(8, "little") + bytes(8)))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[i:i + sector_size]) + ctx.finalize()
    return bytes(out)


def pread_file(path: Path, length: int, offset: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def pwrite_file(path: Path, data: bytes, offset: int) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


def open_volume(path: Path, key_id: str, kek: bytes) -> Volume:
    vol = Volume.open(open_backstore(str(path)))
    assert vol.state == State.WAITING_FOR_KEY, vol.reason
    assert vol.offer_kek(key_id, kek) == State.ENCRYPTED, vol.reason
    return vol


# =================================================================================================
# our headers, read by cryptsetup
# =================================================================================================

def test_cryptsetup_is_available() -> None:
    out = cs("--version").stdout
    assert re.match(r"cryptsetup 2\.\d+", out), out


LAYOUTS = [(512, fmt.MIN_DATA_OFFSET), (512, fmt.DEFAULT_DATA_OFFSET),
           (4096, fmt.MIN_DATA_OFFSET), (4096, fmt.DEFAULT_DATA_OFFSET)]


@pytest.mark.parametrize(("sector_size", "data_offset"), LAYOUTS,
                         ids=[f"{s}-{'min' if o == fmt.MIN_DATA_OFFSET else 'default'}" for s, o in LAYOUTS])
def test_luksdump_reads_our_header(tmp_path: Path, sector_size: int, data_offset: int) -> None:
    ev = make_evlu(tmp_path, sector_size=sector_size, data_offset=data_offset,
                   key_id="6b1f0c2e-kmip-uid", kms="site-a", label="lun-7")
    dump = cs_dump(ev.path)
    assert dump_field(dump, "Version") == "2"
    assert dump_field(dump, "Epoch") == str(ev.header.seqid)
    assert dump_field(dump, "UUID") == ev.header.uuid
    assert dump_field(dump, "Label") == "lun-7"
    assert dump_field(dump, "Subsystem") == "evlu"
    assert dump_field(dump, "Metadata area") == "16384 [bytes]"
    assert dump_field(dump, "Keyslots area") == f"{data_offset - 2 * 16384} [bytes]"
    segment = dump.split("Data segments:", 1)[1].split("Keyslots:", 1)[0]
    assert f"offset: {data_offset} [bytes]" in segment
    assert f"sector: {sector_size} [bytes]" in segment
    assert "cipher: aes-xts-plain64" in segment
    tokens = dump.split("Tokens:", 1)[1].split("Digests:", 1)[0]
    assert re.search(r"0: evlu-kmip\s+Keyslot:\s+0\b", tokens), tokens
    keyslots = dump.split("Keyslots:", 1)[1].split("Tokens:", 1)[0]
    assert re.search(r"0: luks2\s+Key:\s+512 bits", keyslots), keyslots

    # the JSON as cryptsetup parsed it is exactly ours, token included
    meta = cs_json(ev.path)
    assert meta == ev.header.metadata.to_json()
    assert meta["tokens"] == {"0": evlu_token("6b1f0c2e-kmip-uid", "site-a", 0)}
    assert meta["segments"]["0"]["offset"] == str(data_offset)
    assert meta["segments"]["0"]["sector_size"] == sector_size
    exported = json.loads(cs("token", "export", "--token-id", "0", ev.path).stdout)
    assert exported == evlu_token("6b1f0c2e-kmip-uid", "site-a", 0)


def test_cryptsetup_opens_with_the_kek(tmp_path: Path) -> None:
    ev = make_evlu(tmp_path)
    _, wrong = key_file(tmp_path, "wrong")
    assert check_passphrase(ev.path, ev.kek_file) == 0
    assert check_passphrase(ev.path, ev.kek_file, "--key-slot", "0") == 0
    assert check_passphrase(ev.path, wrong) == EXIT_NO_PERMISSION
    # a KEK one byte short is a different passphrase
    short = tmp_path / "short"
    short.write_bytes(ev.kek[:-1])
    assert check_passphrase(ev.path, short) == EXIT_NO_PERMISSION


def test_cryptsetup_accepts_the_dek_as_volume_key(tmp_path: Path) -> None:
    ev = make_evlu(tmp_path, sector_size=4096)
    assert check_volume_key(ev.path, ev.dek_file) == 0
    bad = tmp_path / "bad-dek"
    bad.write_bytes(bytes([ev.dek[0] ^ 1]) + ev.dek[1:])
    assert check_volume_key(ev.path, bad) == EXIT_NO_PERMISSION
    # and cryptsetup unwraps our keyslot to the very same key
    out = tmp_path / "vk-by-cryptsetup"
    cs("luksDump", "--dump-volume-key", "--batch-mode", "--key-file", ev.kek_file,
       "--volume-key-file", out, ev.path)
    assert out.read_bytes() == ev.dek


def test_bindings_added_rotated_removed_by_us_are_seen_by_cryptsetup(tmp_path: Path) -> None:
    ev = make_evlu(tmp_path)
    kek2, kek2_file = key_file(tmp_path, "kek2")
    kek3, kek3_file = key_file(tmp_path, "kek3")

    with store(ev.path) as dev:
        header = fmt.add_binding(dev, ev.header, ev.dek, kek2, fmt.Binding("dr-key", "dr"))
    dump = cs_dump(ev.path)
    assert dump_field(dump, "Epoch") == str(header.seqid)
    assert cs_json(ev.path) == header.metadata.to_json()
    assert json.loads(cs("token", "export", "--token-id", "1", ev.path).stdout) == \
        evlu_token("dr-key", "dr", 1)
    assert check_passphrase(ev.path, ev.kek_file, "--key-slot", "0") == 0
    assert check_passphrase(ev.path, kek2_file, "--key-slot", "1") == 0
    assert check_passphrase(ev.path, kek2_file, "--key-slot", "0") == EXIT_NO_PERMISSION

    # rotate the first binding: the old KEK is refused, the new one and the DR one accepted
    with store(ev.path) as dev:
        header = fmt.rotate(dev, header, 0, ev.dek, kek3, fmt.Binding("prod-key-v2", "prod"))
    cs_dump(ev.path)
    meta = cs_json(ev.path)
    assert meta == header.metadata.to_json()
    new_slot = meta["tokens"]["0"]["keyslots"][0]
    assert meta["tokens"]["0"] == evlu_token("prod-key-v2", "prod", int(new_slot))
    assert sorted(meta["keyslots"]) == sorted({"1", new_slot})
    assert check_passphrase(ev.path, ev.kek_file) == EXIT_NO_PERMISSION
    assert check_passphrase(ev.path, kek3_file, "--key-slot", new_slot) == 0
    assert check_passphrase(ev.path, kek2_file) == 0
    assert check_volume_key(ev.path, ev.dek_file) == 0

    # remove the DR binding: its KEK is refused, its keyslot gone
    with store(ev.path) as dev:
        header = fmt.remove_binding(dev, header, 1)
    cs_dump(ev.path)
    meta = cs_json(ev.path)
    assert meta == header.metadata.to_json()
    assert list(meta["tokens"]) == ["0"] and list(meta["keyslots"]) == [new_slot]
    assert meta["digests"]["0"]["keyslots"] == [new_slot]
    assert check_passphrase(ev.path, kek2_file) == EXIT_NO_PERMISSION
    assert check_passphrase(ev.path, kek3_file) == 0
    assert check_volume_key(ev.path, ev.dek_file) == 0


# =================================================================================================
# cryptsetup's devices, read by us
# =================================================================================================

@dataclass
class CsDevice:
    path: Path
    passphrase: bytes
    pass_file: Path
    vk: bytes
    vk_file: Path


def luks_format(tmp_path: Path, *args: str, key_bytes: int = 64, size: int = 20 * MiB,
                name: str = "cs.img", vk: bytes | None = None) -> CsDevice:
    """``cryptsetup luksFormat`` with a volume key we chose and a binary passphrase file."""
    path = sparse_file(tmp_path / name, size)
    passphrase, pass_file = key_file(tmp_path, name + ".pass")
    if vk is None:
        vk, vk_file = key_file(tmp_path, name + ".vk", key_bytes)
    else:
        vk_file = tmp_path / (name + ".vk")
        vk_file.write_bytes(vk)
        key_bytes = len(vk)
    cs("luksFormat", "--type", "luks2", "--batch-mode", "--key-size", str(key_bytes * 8),
       "--volume-key-file", vk_file, *args, path, pass_file)
    return CsDevice(path, passphrase, pass_file, vk, vk_file)


CS_FORMATS = {
    "argon2id": (FAST_ARGON2ID, 64),
    "argon2i": (FAST_ARGON2I, 64),
    "pbkdf2": (FAST_PBKDF2, 64),
    "pbkdf2-sha512": (FAST_PBKDF2 + ("--hash", "sha512"), 64),
    "sector-512": (FAST_PBKDF2 + ("--sector-size", "512"), 64),
    "sector-4096": (FAST_PBKDF2 + ("--sector-size", "4096"), 64),
    "metadata-64k": (FAST_PBKDF2 + ("--luks2-metadata-size", "64k"), 64),
    "aes-128-xts": (FAST_PBKDF2, 32),
    "offset": (FAST_PBKDF2 + ("--offset", "4096"), 64),
}


@pytest.mark.parametrize("kind", list(CS_FORMATS))
def test_we_unlock_cryptsetup_devices(tmp_path: Path, kind: str) -> None:
    args, key_bytes = CS_FORMATS[kind]
    dev = luks_format(tmp_path, *args, key_bytes=key_bytes)
    cs_meta = cs_json(dev.path)
    with store(dev.path) as bs:
        result = fmt.read(bs)
        assert not result.needs_repair, result.problems
        header = result.header
        md = header.metadata
        assert md.to_json() == cs_meta
        seg = md.data_segment
        assert seg.offset == int(cs_meta["segments"]["0"]["offset"])
        assert seg.sector_size == cs_meta["segments"]["0"]["sector_size"]
        assert md.evlu_tokens() == []
        assert header.seqid == int(dump_field(cs_dump(dev.path), "Epoch"))
        if kind == "offset":
            assert seg.offset == 4096 * 512
        if kind == "metadata-64k":
            assert header.hdr_size == 64 * KiB
        if kind == "sector-512":
            assert seg.sector_size == 512
        if kind == "sector-4096":
            assert seg.sector_size == 4096
        ks = md.keyslots[0]
        assert ks.key_size == key_bytes
        assert ks.kdf.type == {"argon2id": "argon2id", "argon2i": "argon2i"}.get(kind, "pbkdf2")

        assert fmt.unlock(bs, header, dev.passphrase) == dev.vk
        assert fmt.unlock_keyslot(bs, header, 0, dev.passphrase) == dev.vk
        with pytest.raises(fmt.WrongKeyError):
            fmt.unlock(bs, header, dev.passphrase[:-1] + bytes([dev.passphrase[-1] ^ 0x80]))
        with pytest.raises(fmt.WrongKeyError):
            fmt.unlock(bs, header, b"not the passphrase")


def test_secondary_header_scan_on_cryptsetup_64k_metadata(tmp_path: Path) -> None:
    """A 64 KiB-metadata device whose primary header area is wiped: we find the
    secondary copy at 64 KiB by scanning, unlock, and our repair gives a device
    cryptsetup accepts with both copies valid."""
    dev = luks_format(tmp_path, *FAST_PBKDF2, "--luks2-metadata-size", "64k")
    before = cs_json(dev.path)
    pwrite_file(dev.path, bytes(64 * KiB), 0)
    with store(dev.path) as bs:
        result = fmt.read(bs)
        assert (result.primary_ok, result.secondary_ok) == (False, True)
        assert result.header.hdr_size == 64 * KiB
        assert result.header.metadata.to_json() == before
        assert fmt.unlock(bs, result.header, dev.passphrase) == dev.vk
        fmt.repair(bs, result)
        again = fmt.read(bs)
        assert not again.needs_repair, again.problems
    cs_dump(dev.path)
    assert cs_json(dev.path) == before
    assert check_passphrase(dev.path, dev.pass_file) == 0


# =================================================================================================
# tokens and header edits, both ways
# =================================================================================================

def test_token_round_trip_and_cryptsetup_edits(tmp_path: Path) -> None:
    ev = make_evlu(tmp_path, key_id="uid-prod", kms="prod")
    assert json.loads(cs("token", "export", "--token-id", "0", ev.path).stdout) == \
        evlu_token("uid-prod", "prod", 0)

    # cryptsetup imports a second binding of keyslot 0 (a DR site's KMS holding the same KEK)
    cs("token", "import", ev.path, stdin=json.dumps(evlu_token("x", "dr", 0)))
    header = read_header(ev.path)
    assert [(t.id, t.keyslots, t.key_id, t.kms) for t in header.metadata.evlu_tokens()] == \
        [(0, (0,), "uid-prod", "prod"), (1, (0,), "x", "dr")]
    with store(ev.path) as dev:
        for token in header.metadata.evlu_tokens():
            assert fmt.unlock(dev, header, ev.kek, token) == ev.dek
        # a header we rewrite keeps cryptsetup's token and still dumps cleanly
        kek2, kek2_file = key_file(tmp_path, "kek2")
        header = fmt.add_binding(dev, header, ev.dek, kek2, fmt.Binding("uid-2", "prod"))
    cs_dump(ev.path)
    meta = cs_json(ev.path)
    assert meta == header.metadata.to_json()
    assert meta["tokens"]["1"] == evlu_token("x", "dr", 0)
    assert meta["tokens"]["2"] == evlu_token("uid-2", "prod", 1)
    assert check_passphrase(ev.path, kek2_file, "--key-slot", "1") == 0

    # cryptsetup removes a token: we see it gone, the keyslot stays
    cs("token", "remove", "--token-id", "1", ev.path)
    header = read_header(ev.path)
    assert [(t.id, t.key_id) for t in header.metadata.evlu_tokens()] == [(0, "uid-prod"), (2, "uid-2")]
    assert sorted(header.metadata.keyslots) == [0, 1]

    # cryptsetup adds an (argon2id) keyslot: we unlock with its passphrase, then place our
    # next keyslot where it does not overlap cryptsetup's
    pw, pw_file = key_file(tmp_path, "recovery-pass")
    cs("luksAddKey", "--batch-mode", *FAST_ARGON2ID, "--key-file", ev.kek_file, ev.path, pw_file)
    header = read_header(ev.path)
    cs_slot = max(header.metadata.keyslots)
    assert header.metadata.keyslots[cs_slot].kdf.type == "argon2id"
    with store(ev.path) as dev:
        assert fmt.unlock(dev, header, pw) == ev.dek
        assert fmt.unlock_keyslot(dev, header, cs_slot, pw) == ev.dek
        kek3, kek3_file = key_file(tmp_path, "kek3")
        header = fmt.add_binding(dev, header, ev.dek, kek3, fmt.Binding("uid-3", "dr"))
    areas = sorted((ks.area_offset, ks.area_offset + ks.area_size)
                   for ks in header.metadata.keyslots.values())
    assert all(hi <= lo for (_, hi), (lo, _) in zip(areas, areas[1:])), areas
    cs_dump(ev.path)
    new_slot = next(t.keyslots[0] for t in header.metadata.evlu_tokens() if t.key_id == "uid-3")
    for slot, key in ((0, ev.kek_file), (1, kek2_file), (cs_slot, pw_file), (new_slot, kek3_file)):
        assert check_passphrase(ev.path, key, "--key-slot", str(slot)) == 0, slot

    # cryptsetup kills the (unbound) recovery keyslot: we see it gone, the digest updated
    cs("luksKillSlot", "--batch-mode", ev.path, str(cs_slot))
    header = read_header(ev.path)
    assert cs_slot not in header.metadata.keyslots
    assert cs_slot not in header.metadata.digest_for_segment(0).keyslots
    with store(ev.path) as dev:
        with pytest.raises(fmt.WrongKeyError):
            fmt.unlock(dev, header, pw)
        assert fmt.unlock(dev, header, kek3) == ev.dek


def test_luks_kill_slot_of_a_bound_keyslot(tmp_path: Path) -> None:
    ev = make_evlu(tmp_path)
    kek2, _ = key_file(tmp_path, "kek2")
    with store(ev.path) as dev:
        fmt.add_binding(dev, ev.header, ev.dek, kek2, fmt.Binding("dr-key", "dr"))
    cs("luksKillSlot", "--batch-mode", ev.path, "1")
    assert cs_json(ev.path)["tokens"]["1"]["keyslots"] == []  # cryptsetup's way of unbinding
    header = read_header(ev.path)
    assert all(1 not in t.keyslots for t in header.metadata.evlu_tokens())
    with store(ev.path) as dev:
        assert fmt.unlock(dev, header, ev.kek) == ev.dek
    vol = open_volume(ev.path, "kmip-uid-1", ev.kek)
    vol.close()


def test_foreign_token_with_out_of_range_number_is_refused_cleanly(tmp_path: Path) -> None:
    """cryptsetup keeps 1e400 verbatim; we cannot re-encode it faithfully, so we refuse the
    header with a clear error instead of ever writing non-JSON 'Infinity'."""
    ev = make_evlu(tmp_path)
    cs("token", "import", ev.path, stdin='{"type":"acme-vendor","keyslots":[],"scale":1e400}')
    with pytest.raises(fmt.HeaderCorruptError, match="does not parse"):
        read_header(ev.path)


# =================================================================================================
# the data area: Volume vs an independent aes-xts-plain64
# =================================================================================================

def far_lbas(sector_size: int, capacity: int) -> list[int]:
    """LBAs whose plain64 IV (512-byte units) needs more than 32 bits, and the ends."""
    far = (2**33 + 12345) if sector_size == 512 else (2**30 + 777)  # IV ~ 2**33 either way
    assert far + 3 < capacity
    return [0, 1, 7, far, far + 3, capacity - 1]


@pytest.mark.parametrize("iv_tweak", [0, 12345678901], ids=["iv_tweak-0", "iv_tweak-large"])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_volume_writes_dm_crypt_plain64_ciphertext(tmp_path: Path, sector_size: int,
                                                   iv_tweak: int) -> None:
    ev = make_evlu(tmp_path, sector_size=sector_size, size=fmt.MIN_DATA_OFFSET + 5 * TiB)
    if iv_tweak:  # as cryptsetup's reencryption writes it: the segment's IV offset
        with store(ev.path) as dev:
            obj = ev.header.metadata.to_json()
            obj["segments"]["0"]["iv_tweak"] = str(iv_tweak)
            disk.write(dev, ev.header.with_metadata(fmt.Metadata(obj, ev.header.hdr_size)))
        cs_dump(ev.path)
    offset = fmt.MIN_DATA_OFFSET
    vol = open_volume(ev.path, "kmip-uid-1", ev.kek)
    try:
        assert vol.block_size == sector_size
        assert vol.num_blocks == 5 * TiB // sector_size
        lbas = far_lbas(sector_size, vol.num_blocks)
        written = {}
        for lba in lbas:
            data = os.urandom(sector_size)
            vol.write(lba, data)
            written[lba] = data
        # a multi-sector write at a far LBA: the IV must advance per sector
        multi_lba = lbas[3] + 100
        multi = os.urandom(5 * sector_size)
        vol.write(multi_lba, multi)
        vol.flush()
        for lba, data in [*written.items(), (multi_lba, multi)]:
            raw = pread_file(ev.path, len(data), offset + lba * sector_size)
            expect = plain64_xts(ev.dek, data, lba, sector_size, iv_tweak, encrypt=True)
            assert raw == expect, f"ciphertext of LBA {lba} differs from aes-xts-plain64"
            assert vol.read(lba, len(data) // sector_size) == data
    finally:
        vol.close()


CS_VOLUMES = {"512": (512, 64), "4096": (4096, 64), "512-aes128": (512, 32),
              "4096-aes128": (4096, 32)}


@pytest.mark.parametrize("kind", list(CS_VOLUMES))
def test_volume_reads_cryptsetup_device(tmp_path: Path, kind: str) -> None:
    sector_size, key_bytes = CS_VOLUMES[kind]
    dev = luks_format(tmp_path, *FAST_PBKDF2, "--sector-size", str(sector_size),
                      key_bytes=key_bytes, size=16 * MiB + 5 * TiB)
    cs("token", "import", dev.path,
       stdin=json.dumps({"type": "evlu-kmip", "keyslots": ["0"], "key_id": "cs-key", "kms": "dr"}))
    offset = int(cs_json(dev.path)["segments"]["0"]["offset"])
    capacity = (16 * MiB + 5 * TiB - offset) // sector_size
    lbas = far_lbas(sector_size, capacity)
    plain = {lba: os.urandom(sector_size) for lba in lbas}
    plain[lbas[3] + 10] = os.urandom(4 * sector_size)  # several sectors: the IV advances per sector
    for lba, data in plain.items():
        pwrite_file(dev.path, plain64_xts(dev.vk, data, lba, sector_size, 0, encrypt=True),
                    offset + lba * sector_size)

    vol = open_volume(dev.path, "cs-key", dev.passphrase)
    try:
        assert (vol.block_size, vol.num_blocks, vol.data_offset) == (sector_size, capacity, offset)
        for lba, data in plain.items():
            assert vol.read(lba, len(data) // sector_size) == data, f"LBA {lba}"
        # and what the volume writes there, the independent cipher decrypts
        fresh = os.urandom(3 * sector_size)
        vol.write(lbas[3] + 50, fresh)
        raw = pread_file(dev.path, len(fresh), offset + (lbas[3] + 50) * sector_size)
        assert plain64_xts(dev.vk, raw, lbas[3] + 50, sector_size, 0, encrypt=False) == fresh
    finally:
        vol.close()
    cs_dump(dev.path)  # the volume left the header alone


def test_volume_with_a_cryptsetup_key_of_equal_xts_halves(tmp_path: Path) -> None:
    half = os.urandom(32)
    dev = luks_format(tmp_path, *FAST_PBKDF2, vk=half + half)
    cs("token", "import", dev.path, stdin=json.dumps(evlu_token("cs-key", "dr", 0)))
    with store(dev.path) as bs:
        assert fmt.unlock(bs, read_header(dev.path), dev.passphrase) == half + half
    vol = Volume.open(open_backstore(str(dev.path)))
    try:
        state = vol.offer_kek("cs-key", dev.passphrase)
        assert state == State.NO_KEY and "unusable" in vol.reason, vol.reason
    finally:
        vol.close()
