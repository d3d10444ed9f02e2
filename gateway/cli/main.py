"""``evlu``: create, inspect, check, migrate and re-key eVLUs from the shell.

Exit codes (also in ``evlu --help``):
  0 success            4 the key does not open the volume
  1 error (I/O, ...)   5 header damaged: one copy bad (``evlu check --repair`` fixes it)
  2 usage error/layout 6 metadata unusable (no valid copy, or an unsupported feature)
  3 no eVLU header     7 refused: the operation needs confirmation (--yes/--confirm/--force)
"""

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

from .. import __version__
from .. import format as fmt
from ..backstore import Backstore, BackstoreError, open_backstore
from ..volume import OperationRefusedError, State, Volume, VolumeError, wipe_data_area
from .progress import Progress
from .sizes import parse_size

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_HEADER = 0, 1, 2, 3
EXIT_WRONG_KEY, EXIT_DAMAGED, EXIT_UNUSABLE, EXIT_REFUSED = 4, 5, 6, 7
_CHUNK = 1 << 20


class CliError(Exception):
    """An error with the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


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


def _open_evlu(dev: Backstore) -> Volume:
    """The eVLU on ``dev``; a CliError saying why when it has no usable header."""
    vol = Volume.open(dev)
    if vol.header is None:
        _read_header(dev)  # raises with the precise reason
        raise CliError(f"{dev.path}: {vol.reason}", EXIT_UNUSABLE)
    return vol


@contextmanager
def _unlocked(path: str, kek: bytes, *, readonly: bool) -> Iterator[Volume]:
    """An ENCRYPTED volume: the KEK is offered for every binding of the header."""
    with _device(path, readonly=readonly) as dev:
        vol = _open_evlu(dev)
        for token in vol.bindings:
            vol.offer_kek(token.key_id, kek)
        if vol.state != State.ENCRYPTED:
            raise CliError(f"{path}: the KEK does not open any binding ({vol.reason})",
                           EXIT_WRONG_KEY)
        try:
            yield vol
        finally:
            vol.close()


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
    kek = _read_kek(args.kek_file)
    binding = fmt.Binding(args.key_id or f"local-{uuid.uuid4()}", args.kms)
    with _device(args.device, readonly=False) as dev:
        fmt.check_layout(dev.size, args.sector_size, args.data_offset)
        if fmt.probe(dev) and not args.force:
            raise CliError(f"{args.device} already has a LUKS header; refusing to overwrite it "
                           "(--force destroys it and all data it protects)", EXIT_REFUSED)
        if _has_data(dev, args.data_offset):
            _confirm(args, f"{args.device} holds data; formatting makes it unreadable for good")
        header, dek = fmt.create(dev, kek, binding, sector_size=args.sector_size,
                                 data_offset=args.data_offset, force=args.force, label=args.label)
        dek[:] = bytes(len(dek))
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
    return EXIT_OK


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
    kek = _read_kek(args.kek_file)
    with _unlocked(args.device, kek, readonly=False) as vol, _stream(args.src, "rb") as src:
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
    kek = _read_kek(args.kek_file)
    with _unlocked(args.device, kek, readonly=True) as vol, _stream(args.dest, "wb") as dest:
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


def cmd_rotate(args: argparse.Namespace) -> int:
    kek, new_kek = _read_kek(args.kek_file), _read_kek(args.new_kek_file)
    with _unlocked(args.device, kek, readonly=False) as vol:
        header = vol.header
        assert header is not None
        old = _select_binding(header, args.key_id, kek, vol.backstore)
        new_binding = fmt.Binding(args.new_key_id or f"local-{uuid.uuid4()}", args.kms or old.kms)
        vol.rotate(old.key_id, new_kek, new_binding)
    print(f"{args.device}: key {old.key_id} replaced by {new_binding.key_id} "
          f"(KMS {new_binding.kms}); no data rewritten")
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
    kek, new_kek = _read_kek(args.kek_file), _read_kek(args.new_kek_file)
    binding = fmt.Binding(args.new_key_id or f"local-{uuid.uuid4()}", args.kms)
    with _unlocked(args.device, kek, readonly=False) as vol:
        vol.add_binding(new_kek, binding)
    print(f"{args.device}: added binding to key {binding.key_id} (KMS {binding.kms})")
    return EXIT_OK


def cmd_unbind(args: argparse.Namespace) -> int:
    with _device(args.device, readonly=False) as dev:
        _open_evlu(dev).remove_binding(args.key_id)
    print(f"{args.device}: removed binding to key {args.key_id}")
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

def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evlu", description="Manage encrypted virtual LUNs (LUKS2-compatible eVLUs).",
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"evlu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
            device: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if device:
            p.add_argument("device", metavar="DEVICE", help="backing file or block device")
        p.set_defaults(func=func)
        return p

    def kek(p: argparse.ArgumentParser, flag: str = "--kek-file", what: str = "KEK") -> None:
        p.add_argument(flag, required=True, metavar="FILE",
                       help=f"file holding the {what} (raw bytes, as cryptsetup --key-file)")

    p = add("format", cmd_format, "Create an eVLU: random DEK wrapped under the KEK, bound to a key id.")
    kek(p)
    p.add_argument("--key-id", help="KMS key id of the KEK (default: a new local-UUID id)")
    p.add_argument("--kms", default="default", help="KMS profile name (default: %(default)s)")
    p.add_argument("--sector-size", type=int, choices=(512, 4096), default=512,
                   help="encryption sector = LUN block size (default: %(default)s)")
    p.add_argument("--data-offset", type=_size_arg, default=fmt.DEFAULT_DATA_OFFSET,
                   help=f"start of the data area, e.g. 16M (default 16 MiB, minimum "
                        f"{fmt.MIN_DATA_OFFSET // 1024} KiB)")
    p.add_argument("--label", default="", help="LUKS2 label")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing LUKS header (destroys what it protects)")
    p.add_argument("--yes", action="store_true", help="do not ask before overwriting data")
    p.add_argument("--no-wipe", action="store_true",
                   help="do not zero the data area (old data stays on the medium, unreadable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress meter")

    p = add("dump", cmd_dump, "Show the header: copies, segment, keyslots, bindings.")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("check", cmd_check, "Verify both header copies (exit 5 if one needs repair).")
    p.add_argument("--repair", action="store_true", help="rewrite a damaged or stale copy")

    p = add("unlock-check", cmd_unlock_check, "Exit 0 only if the KEK opens the volume.")
    kek(p)
    p.add_argument("--key-id", help="only try the binding with this key id")

    p = add("copy-in", cmd_copy_in, "Stream plaintext from SRC into the volume (from block 0).",
            device=False)
    p.add_argument("src", metavar="SRC", help="source file or block device ('-' = stdin)")
    p.add_argument("device", metavar="DEVICE", help="eVLU backing file or block device")
    kek(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress meter")

    p = add("copy-out", cmd_copy_out, "Stream the volume's plaintext to DEST.")
    p.add_argument("dest", metavar="DEST", help="destination file ('-' = stdout)")
    kek(p)
    p.add_argument("--length", type=_size_arg, help="bytes to copy (default: the whole volume)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress meter")

    p = add("rotate", cmd_rotate, "Re-wrap the DEK under a new KEK (no data rewrite).")
    kek(p, what="current KEK")
    kek(p, "--new-kek-file", "new KEK")
    p.add_argument("--key-id", help="binding to rotate (default: the one the KEK opens)")
    p.add_argument("--new-key-id", help="key id of the new KEK (default: a new local-UUID id)")
    p.add_argument("--kms", help="KMS profile of the new KEK (default: unchanged)")

    p = add("bind", cmd_bind, "Add a binding to a second KEK (e.g. a DR site's KMS).")
    kek(p, what="current KEK")
    kek(p, "--new-kek-file", "additional KEK")
    p.add_argument("--new-key-id", help="key id of the additional KEK")
    p.add_argument("--kms", default="default", help="KMS profile of the additional KEK")

    p = add("unbind", cmd_unbind, "Remove one binding (never the last one).")
    p.add_argument("--key-id", required=True, help="key id of the binding to remove")

    p = add("off", cmd_off, "Remove encryption: all bindings and the header (data is lost).")
    p.add_argument("--confirm", action="store_true", help="required: yes, destroy the data")
    return parser


#: exception type -> exit code, most specific first
_EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (OperationRefusedError, EXIT_REFUSED), (fmt.WrongKeyError, EXIT_WRONG_KEY),
    (fmt.HeaderExistsError, EXIT_REFUSED), (fmt.NoHeaderError, EXIT_NO_HEADER),
    (fmt.LayoutError, EXIT_USAGE), (fmt.FormatError, EXIT_UNUSABLE),
    (BackstoreError, EXIT_ERROR), (VolumeError, EXIT_ERROR),
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"evlu: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("evlu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = next((c for t, c in _EXIT_CODES if isinstance(exc, t)), None)
        if code is None:
            raise
        print(f"evlu: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
