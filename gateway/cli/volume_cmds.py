"""``evlu format``, ``dump``, ``check``, ``unlock-check``, ``copy-in``, ``copy-out``,
``rotate``, ``bind``, ``unbind``, ``shred`` and ``off``: one eVLU's header, keys and data."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from .. import format as fmt
from ..backstore import Backstore, BackstoreError, open_backstore
from ..kms import Config, KmsError
from ..kms.audit import AuditLog
from ..volume import State, Volume, wipe_data_area
from .errors import (EXIT_DAMAGED, EXIT_ERROR, EXIT_KMS_REFUSED, EXIT_NO_HEADER, EXIT_OK,
                     EXIT_REFUSED, EXIT_UNUSABLE, EXIT_USAGE, EXIT_WRONG_KEY, CliError)
from .keys import KmsSession
from .progress import Progress

_CHUNK = 1 << 20


def _read_kek(path: str) -> bytes:
    """The KEK: the file's raw bytes, exactly as ``cryptsetup --key-file`` reads them."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            kek = f.read()
    except OSError as exc:
        raise CliError(f"cannot read KEK file {path}: {exc.strerror}") from None
    if not kek:
        raise CliError(f"KEK file {path} is empty")
    if stat.S_ISREG(mode) and mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"evlu: warning: KEK file {path} is accessible by group/others; chmod 600 it",
              file=sys.stderr)
    return kek


@contextmanager
def _device(path: str, *, readonly: bool) -> Iterator[Backstore]:
    try:
        dev = open_backstore(path, readonly=readonly)
    except BackstoreError as exc:
        raise CliError(str(exc)) from None
    try:
        yield dev
    finally:
        dev.close()


def _read_header(dev: Backstore) -> fmt.ReadResult:
    try:
        return fmt.read(dev)
    except fmt.NoHeaderError:
        raise CliError(f"{dev.path} has no LUKS2 header: it is not an eVLU (create one with "
                       "'evlu format')", EXIT_NO_HEADER) from None
    except fmt.FormatError as exc:
        raise CliError(f"{dev.path}: {exc}", EXIT_UNUSABLE) from None


def _open_evlu(dev: Backstore, session: KmsSession | None = None) -> Volume:
    """The eVLU on ``dev``; a CliError saying why when it has no usable header."""
    vol = Volume.open(dev, key_source=session.lookups if session else None)
    if vol.header is None:
        _read_header(dev)  # raises with the precise reason
        raise CliError(f"{dev.path}: {vol.reason}", EXIT_UNUSABLE)
    return vol


@contextmanager
def _kms(args: argparse.Namespace) -> Iterator[KmsSession]:
    session = KmsSession.from_args(args)
    try:
        yield session
    finally:
        session.close()


@contextmanager
def _unlocked(args: argparse.Namespace, *, readonly: bool,
              session: KmsSession | None = None) -> Iterator[Volume]:
    """An ENCRYPTED volume, unlocked with ``--kek-file`` or else through the KMS."""
    with _device(args.device, readonly=readonly) as dev:
        if args.kek_file:
            kek = _read_kek(args.kek_file)
            vol = _open_evlu(dev)
            for token in vol.bindings:
                vol.offer_kek(token.key_id, kek)
            if vol.state != State.ENCRYPTED:
                vol.close()
                raise CliError(f"{args.device}: the KEK does not open any binding "
                               f"({vol.reason})", EXIT_WRONG_KEY)
        else:
            if session is None:
                raise CliError("internal: a KMS session is needed")
            vol = _open_evlu(dev, session)
            try:
                session.wait_unlocked(vol, args.wait)
            except KmsError:
                vol.close()
                raise
        try:
            yield vol
        finally:
            vol.close()


@contextmanager
def _unlocked_any(args: argparse.Namespace, *, readonly: bool) -> Iterator[Volume]:
    """:func:`_unlocked` with a KMS session of its own when there is no --kek-file."""
    if args.kek_file:
        with _unlocked(args, readonly=readonly) as vol:
            yield vol
    else:
        with _kms(args) as session, _unlocked(args, readonly=readonly, session=session) as vol:
            yield vol


def _confirm(args: argparse.Namespace, question: str) -> None:
    if getattr(args, "yes", False):
        return
    if not sys.stdin.isatty():
        raise CliError(f"{question}; pass --yes to confirm non-interactively", EXIT_REFUSED)
    answer = input(f"{question}\nType 'yes' to continue: ")
    if answer.strip() != "yes":
        raise CliError("aborted", EXIT_REFUSED)


def _has_data(dev: Backstore, data_offset: int) -> bool:
    for offset in (0, data_offset):
        length = min(_CHUNK, dev.size - offset)
        if length > 0 and any(dev.pread(length, offset)):
            return True
    return False


# -- commands -----------------------------------------------------------------

def cmd_format(args: argparse.Namespace) -> int:
    if args.kek_file:
        kek = bytearray(_read_kek(args.kek_file))
        binding = fmt.Binding(args.key_id or f"local-{uuid.uuid4()}", args.kms or "default")
        _format(args, kek, binding, str(uuid.uuid4()), None)
        return EXIT_OK
    if args.key_id:
        raise CliError("--key-id goes with --kek-file; with the KMS a new KEK is provisioned",
                       EXIT_USAGE)
    with _kms(args) as session:
        with _device(args.device, readonly=False) as dev:
            _check_format_target(args, dev)
        volume_uuid = str(uuid.uuid4())
        profile = session.profile_name(args.kms)
        manager = session.manager(profile)
        key_id = manager.provision(volume_uuid)
        session.audit.record("provision", volume=volume_uuid, key_id=key_id, kms=profile)
        try:
            _format(args, manager.fetch(key_id), fmt.Binding(key_id, profile), volume_uuid,
                    session)
        except BaseException:  # the KEK must not outlive a failed format
            manager.destroy(key_id)
            session.audit.record("destroy", volume=volume_uuid, key_id=key_id, kms=profile,
                                 reason="format failed")
            raise
    return EXIT_OK


def _check_format_target(args: argparse.Namespace, dev: Backstore) -> None:
    fmt.check_layout(dev.size, args.sector_size, args.data_offset)
    if fmt.probe(dev) and not args.force:
        raise CliError(f"{args.device} already has a LUKS header; refusing to overwrite it "
                       "(--force destroys it and all data it protects)", EXIT_REFUSED)
    if _has_data(dev, args.data_offset):
        _confirm(args, f"{args.device} holds data; formatting makes it unreadable for good")


def _format(args: argparse.Namespace, kek: bytearray, binding: fmt.Binding, volume_uuid: str,
            session: KmsSession | None) -> None:
    with _device(args.device, readonly=False) as dev:
        if session is None:
            _check_format_target(args, dev)
        try:
            header, dek = fmt.create(dev, kek, binding, sector_size=args.sector_size,
                                     data_offset=args.data_offset, force=args.force,
                                     label=args.label, uuid=volume_uuid)
        finally:
            kek[:] = bytes(len(kek))
        dek[:] = bytes(len(dek))
        if session is not None:
            session.audit.record("format", volume=header.uuid, key_id=binding.key_id,
                                 kms=binding.kms, device=args.device)
        seg = header.metadata.data_segment
        if not args.no_wipe:
            progress = Progress("zeroing the data area", dev.size - seg.offset,
                                enabled=False if args.quiet else None)
            wipe_data_area(dev, seg.offset, progress.advance)
            progress.finish()
        print(f"{args.device}: eVLU created\n  UUID:        {header.uuid}\n"
              f"  key id:      {binding.key_id} (KMS profile {binding.kms})\n"
              f"  sector size: {seg.sector_size}\n  data offset: {seg.offset}\n"
              f"  capacity:    {(dev.size - seg.offset) // seg.sector_size * seg.sector_size} bytes")


def _dump_dict(path: str, result: fmt.ReadResult) -> dict:
    hdr = result.header
    md = hdr.metadata
    return {
        "device": path, "uuid": hdr.uuid, "label": hdr.label, "subsystem": hdr.subsystem,
        "seqid": hdr.seqid, "hdr_size": hdr.hdr_size,
        "copies": {"primary": "ok" if result.primary_ok else "bad",
                   "secondary": "ok" if result.secondary_ok else "bad"},
        "problems": result.problems,
        "bindings": [{"token": t.id, "keyslots": list(t.keyslots), "key_id": t.key_id,
                      "kms": t.kms} for t in md.evlu_tokens()],
        "broken": {"keyslots": {str(k): v for k, v in md.broken_keyslots.items()},
                   "bindings": {str(k): v for k, v in md.broken_tokens().items()}},
        "metadata": md.to_json(),
    }


def cmd_dump(args: argparse.Namespace) -> int:
    with _device(args.device, readonly=True) as dev:
        result = _read_header(dev)
        info = _dump_dict(args.device, result)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    md = result.header.metadata
    print(f"eVLU header of {args.device}\n  UUID:      {info['uuid']}\n  label:     {info['label']}\n"
          f"  seqid:     {info['seqid']}\n  hdr_size:  {info['hdr_size']}\n"
          f"  copies:    primary {info['copies']['primary']}, secondary {info['copies']['secondary']}")
    for problem in result.problems:
        print(f"  problem:   {problem}")
    print("Data segments:")
    for seg in md.segments.values():
        size = "dynamic" if seg.size is None else str(seg.size)
        print(f"  {seg.id}: {seg.encryption}, sector size {seg.sector_size}, offset {seg.offset}, "
              f"size {size}")
    print("Keyslots:")
    for ks in md.keyslots.values():
        print(f"  {ks.id}: {ks.kdf.type}, area {ks.area_offset}+{ks.area_size}, "
              f"{ks.area_encryption}")
    print("Bindings (evlu-kmip tokens):")
    for b in info["bindings"]:
        slots = ", ".join(map(str, b["keyslots"])) or "none (unusable)"
        print(f"  token {b['token']} -> keyslot {slots}: key id {b['key_id']} (KMS {b['kms']})")
    for kind, broken in info["broken"].items():
        for i, why in broken.items():
            print(f"  unusable {kind[:-1]} {i}: {why}")
    others = [t for i, t in md.raw_tokens.items() if t.get("type") != fmt.EVLU_TOKEN]
    for tok in others:
        print(f"  other token: {tok.get('type')}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    with _device(args.device, readonly=not args.repair) as dev:
        result = _read_header(dev)
        if not result.needs_repair:
            print(f"{args.device}: both header copies valid (seqid {result.header.seqid})")
            return EXIT_OK
        for problem in result.problems:
            print(f"{args.device}: {problem}")
        if not args.repair:
            print(f"{args.device}: one header copy needs repair: run 'evlu check --repair "
                  f"{args.device}'")
            return EXIT_DAMAGED
        fmt.repair(dev, result)
        after = fmt.read(dev)
        if after.needs_repair:
            raise CliError(f"{args.device}: repair did not take: {after.problems}", EXIT_UNUSABLE)
        print(f"{args.device}: repaired from the valid copy (seqid {after.header.seqid})")
    return EXIT_OK


def cmd_unlock_check(args: argparse.Namespace) -> int:
    if not args.kek_file:
        with _kms(args) as session, _device(args.device, readonly=True) as dev:
            vol = _open_evlu(dev, session)
            try:
                if args.key_id and args.key_id not in {t.key_id for t in vol.bindings}:
                    raise CliError(f"no binding with key id {args.key_id!r}", EXIT_WRONG_KEY)
                session.wait_unlocked(vol, args.wait)
                print(f"{args.device}: gateway {session.pool.identity_name} can unlock it "
                      f"(key {vol.unlocked_by})")
            finally:
                vol.close()
        return EXIT_OK
    kek = _read_kek(args.kek_file)
    with _device(args.device, readonly=True) as dev:
        header = _read_header(dev).header
        try:
            if args.key_id:
                tokens = [t for t in header.metadata.evlu_tokens() if t.key_id == args.key_id]
                if not tokens:
                    raise CliError(f"no binding with key id {args.key_id!r}", EXIT_WRONG_KEY)
                dek = fmt.unlock(dev, header, kek, tokens[0])
            else:
                dek = fmt.unlock(dev, header, kek)
        except fmt.WrongKeyError:
            print(f"{args.device}: the KEK does not open any keyslot", file=sys.stderr)
            return EXIT_WRONG_KEY
        dek[:] = bytes(len(dek))
    print(f"{args.device}: the KEK opens the volume")
    return EXIT_OK


def _copy(total: int, label: str, step: Callable[[int, int], int], quiet: bool) -> None:
    """Call ``step(offset, length)`` chunk by chunk until ``total`` or until it returns 0."""
    progress = Progress(label, total, enabled=False if quiet else None)
    done = 0
    while done < total:
        n = step(done, min(_CHUNK, total - done))
        if not n:
            break
        done += n
        progress.advance(n)
    progress.finish()


@contextmanager
def _stream(path: str, mode: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer if "r" in mode else sys.stdout.buffer
        return
    try:
        f = open(path, mode)
    except OSError as exc:
        raise CliError(f"cannot open {path}: {exc.strerror}") from None
    with f:
        yield f


def cmd_copy_in(args: argparse.Namespace) -> int:
    with _unlocked_any(args, readonly=False) as vol, _stream(args.src, "rb") as src:
        bs, capacity = vol.block_size, vol.num_blocks * vol.block_size
        total = os.fstat(src.fileno()).st_size if args.src != "-" else capacity
        if args.src != "-" and stat.S_ISBLK(os.fstat(src.fileno()).st_mode):
            total = src.seek(0, os.SEEK_END)
            src.seek(0)
        if total > capacity:
            raise CliError(f"{args.src} is {total} bytes but {args.device} holds only {capacity} "
                           "bytes of data: use a larger device", EXIT_ERROR)
        written = 0

        def step(offset: int, n: int) -> int:
            nonlocal written
            data = src.read(n)
            while data and len(data) < n:  # pipes return short reads
                more = src.read(n - len(data))
                if not more:
                    break
                data += more
            if not data:
                return 0
            got = len(data)
            if got % bs:
                data += bytes(bs - got % bs)
            vol.write(offset // bs, data)
            written += got
            return got

        _copy(total, "copy-in", step, args.quiet)
        vol.flush()
        if args.src == "-" and written == capacity and src.read(1):
            raise CliError(f"the input is larger than the volume's {capacity} bytes; the rest "
                           "was not copied")
    print(f"{args.device}: wrote {written} bytes of plaintext (encrypted on disk)", file=sys.stderr)
    return EXIT_OK


def cmd_copy_out(args: argparse.Namespace) -> int:
    with _unlocked_any(args, readonly=True) as vol, _stream(args.dest, "wb") as dest:
        bs, capacity = vol.block_size, vol.num_blocks * vol.block_size
        total = capacity if args.length is None else args.length
        if total > capacity:
            raise CliError(f"--length {total} exceeds the volume's {capacity} bytes")

        def step(offset: int, n: int) -> int:
            blocks = -(-n // bs)
            dest.write(memoryview(vol.read(offset // bs, blocks))[:n])
            return n

        _copy(total, "copy-out", step, args.quiet)
    return EXIT_OK


def _offline_pair(args: argparse.Namespace) -> bool:
    """True with --kek-file and --new-kek-file (offline), False with neither (KMS)."""
    if bool(args.kek_file) != bool(args.new_kek_file):
        raise CliError("give both --kek-file and --new-kek-file (offline), or neither (KMS)",
                       EXIT_USAGE)
    return bool(args.kek_file)


def cmd_rotate(args: argparse.Namespace) -> int:
    if _offline_pair(args):
        kek, new_kek = _read_kek(args.kek_file), _read_kek(args.new_kek_file)
        with _unlocked(args, readonly=False) as vol:
            header = vol.header
            assert header is not None
            old = _select_binding(header, args.key_id, kek, vol.backstore)
            new_binding = fmt.Binding(args.new_key_id or f"local-{uuid.uuid4()}",
                                      args.kms or old.kms)
            vol.rotate(old.key_id, new_kek, new_binding)
        print(f"{args.device}: key {old.key_id} replaced by {new_binding.key_id} "
              f"(KMS {new_binding.kms}); no data rewritten")
        return EXIT_OK
    if args.new_key_id:
        raise CliError("--new-key-id goes with --new-kek-file; with the KMS a new KEK is "
                       "provisioned", EXIT_USAGE)
    with _kms(args) as session, _unlocked(args, readonly=False, session=session) as vol:
        header = vol.header
        assert header is not None
        old_id = args.key_id or vol.unlocked_by
        old = next((t for t in vol.bindings if t.key_id == old_id), None)
        if old is None:
            raise CliError(f"no binding with key id {old_id!r}", EXIT_USAGE)
        profile = session.profile_name(args.kms) if args.kms else \
            session.pool.profile_for(old.kms)
        manager = session.manager(profile)
        new_id = manager.provision(header.uuid)
        session.audit.record("provision", volume=header.uuid, key_id=new_id, kms=profile)
        new_kek = manager.fetch(new_id)
        try:
            vol.rotate(old.key_id, bytes(new_kek), fmt.Binding(new_id, profile))
        except BaseException:
            manager.destroy(new_id)
            raise
        finally:
            new_kek[:] = bytes(len(new_kek))
        session.audit.record("rotate", volume=header.uuid, key_id=new_id, kms=profile,
                             old_key_id=old.key_id)
        old_manager = session.manager(session.pool.profile_for(old.kms))
        try:
            old_manager.deactivate(old.key_id)
            session.audit.record("deactivate", volume=header.uuid, key_id=old.key_id,
                                 kms=old_manager.profile_name, reason="rotated")
            retired = "deactivated"
        except KmsError as exc:
            session.audit.record("deactivate", outcome="error", volume=header.uuid,
                                 key_id=old.key_id, kms=old_manager.profile_name, reason=str(exc))
            retired = f"NOT deactivated ({exc}); deactivate it in the KMS"
    print(f"{args.device}: key {old.key_id} replaced by {new_id} (KMS {profile}); no data "
          f"rewritten; old key {retired}. Replicas made before this rotation open again only "
          "once re-synced (they still name the old key).")
    return EXIT_OK


def _select_binding(header: fmt.Header, key_id: str | None, kek: bytes,
                    dev: Backstore) -> fmt.EvluToken:
    tokens = header.metadata.evlu_tokens()
    if key_id:
        chosen = [t for t in tokens if t.key_id == key_id]
    else:
        chosen = []
        for t in tokens:
            try:
                fmt.unlock(dev, header, kek, t)[:] = bytes(64)
                chosen.append(t)
            except fmt.WrongKeyError:
                pass
    if len(chosen) != 1:
        raise CliError("say which binding with --key-id (see 'evlu dump')", EXIT_USAGE)
    return chosen[0]


def cmd_bind(args: argparse.Namespace) -> int:
    if _offline_pair(args):
        kek, new_kek = _read_kek(args.kek_file), _read_kek(args.new_kek_file)
        binding = fmt.Binding(args.new_key_id or f"local-{uuid.uuid4()}", args.kms or "default")
        with _unlocked(args, readonly=False) as vol:
            vol.add_binding(new_kek, binding)
        print(f"{args.device}: added binding to key {binding.key_id} (KMS {binding.kms})")
        return EXIT_OK
    if not args.kms:
        raise CliError("say which KMS the new binding goes to: --kms PROFILE (see "
                       "'evlu kms profile list')", EXIT_USAGE)
    with _kms(args) as session, _unlocked(args, readonly=False, session=session) as vol:
        header = vol.header
        assert header is not None
        profile = session.profile_name(args.kms)
        manager = session.manager(profile)
        key_id = manager.provision(header.uuid)
        session.audit.record("provision", volume=header.uuid, key_id=key_id, kms=profile)
        kek = manager.fetch(key_id)
        try:
            vol.add_binding(bytes(kek), fmt.Binding(key_id, profile))
        except BaseException:
            manager.destroy(key_id)
            raise
        finally:
            kek[:] = bytes(len(kek))
        session.audit.record("bind", volume=header.uuid, key_id=key_id, kms=profile)
    print(f"{args.device}: added binding to key {key_id} (KMS {profile})")
    return EXIT_OK


def cmd_unbind(args: argparse.Namespace) -> int:
    with _device(args.device, readonly=False) as dev:
        vol = _open_evlu(dev)
        vol.remove_binding(args.key_id)
        header = vol.header
    _audit_offline(args, "unbind", volume=header.uuid if header else None, key_id=args.key_id)
    print(f"{args.device}: removed binding to key {args.key_id} (the key itself stays in its "
          "KMS; 'evlu shred' destroys keys)")
    return EXIT_OK


def _audit_offline(args: argparse.Namespace, event: str, **fields: str | None) -> None:
    """Record an event that needed no KMS, when this host has a configuration."""
    config = Config(args.config_dir)
    if config.root.is_dir():
        gateway = args.gateway or os.environ.get("EVLU_GATEWAY") or config.settings().gateway
        AuditLog(config.audit_path, gateway or "unknown").record(event, **fields)


def cmd_shred(args: argparse.Namespace) -> int:
    with _device(args.device, readonly=True) as dev:
        header = _read_header(dev).header
    tokens = header.metadata.evlu_tokens()
    if not tokens:
        raise CliError(f"{args.device} has no evlu-kmip binding: nothing to shred", EXIT_USAGE)
    ids = ", ".join(f"{t.key_id} (KMS {t.kms})" for t in tokens)
    _confirm(args, f"destroy key(s) {ids} in the KMS? Every copy and replica of "
                   f"{args.device} (volume {header.uuid}) becomes unreadable, for good")
    failed = 0
    with _kms(args) as session:
        for token in tokens:
            profile = session.pool.profile_for(token.kms)
            try:
                session.manager(profile).destroy(token.key_id)
            except KmsError as exc:
                failed += 1
                session.audit.record("destroy", outcome="error", volume=header.uuid,
                                     key_id=token.key_id, kms=profile, reason=str(exc))
                print(f"evlu: key {token.key_id} (KMS {profile}) NOT destroyed: {exc}",
                      file=sys.stderr)
                continue
            session.audit.record("destroy", volume=header.uuid, key_id=token.key_id, kms=profile)
            print(f"{args.device}: key {token.key_id} destroyed in KMS {profile}")
    if failed:
        raise CliError(f"{failed} of {len(tokens)} key(s) not destroyed; the volume may still "
                       "be readable", EXIT_KMS_REFUSED)
    print(f"{args.device}: volume {header.uuid} is crypto-shredded: no gateway can unlock it "
          "or any replica of it")
    return EXIT_OK


def cmd_off(args: argparse.Namespace) -> int:
    if not args.confirm:
        raise CliError("'evlu off' removes every key binding and the header: the data becomes "
                       "unreadable for good. Copy it out first ('evlu copy-out'), then repeat "
                       "with --confirm", EXIT_REFUSED)
    with _device(args.device, readonly=False) as dev:
        _open_evlu(dev).encrypt_off(confirm=True)
    print(f"{args.device}: encryption metadata removed; the device is now plain")
    return EXIT_OK


# -- parser -------------------------------------------------------------------
