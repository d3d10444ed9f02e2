"""The ``evlu`` command line, run as a user would (a real subprocess) and in-process."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import format as fmt
from gateway.backstore import open_backstore
from gateway.cli import parser
from gateway.cli.main import build_parser, main

SMALL_OFFSET = str(fmt.MIN_DATA_OFFSET)


def evlu(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli.main", *args], input=stdin,
                          capture_output=True, check=False)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("img", "kek", "kek2", "kek3")}
    with open(paths["img"], "wb") as f:
        f.truncate(8 << 20)
    for name in ("kek", "kek2", "kek3"):
        paths[name].write_bytes(os.urandom(32))
        paths[name].chmod(0o600)
    return paths


def fmt_img(files: dict[str, Path], *extra: str) -> None:
    rc = main(["format", str(files["img"]), "--kek-file", str(files["kek"]), "--key-id", "key-A",
               "--data-offset", SMALL_OFFSET, "-q", *extra])
    assert rc == 0


def test_help_everywhere():
    out = evlu("--help")
    assert out.returncode == 0 and b"Exit codes" in out.stdout and b"copy-in" in out.stdout
    for cmd in ("format", "dump", "check", "unlock-check", "copy-in", "copy-out", "rotate",
                "bind", "unbind", "off"):
        sub = evlu(cmd, "--help")
        assert sub.returncode == 0 and b"usage: evlu " + cmd.encode() in sub.stdout, cmd


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in action.choices.values():
            yield from _leaf_parsers(child)


def test_every_command_names_a_function_that_exists():
    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) > 30
    for leaf in leaves:
        module, _, name = leaf.get_default("func").partition(":")
        assert callable(getattr(importlib.import_module(f"gateway.cli.{module}"), name)), leaf.prog


def test_parser_defaults_match_their_modules():
    from gateway.kms.cache import DEFAULT_TTL
    from gateway.lio.boot import SAVECONFIG
    assert (parser.DEFAULT_DATA_OFFSET, parser.MIN_DATA_OFFSET) == (fmt.DEFAULT_DATA_OFFSET,
                                                                   fmt.MIN_DATA_OFFSET)
    assert parser.DEFAULT_TTL == DEFAULT_TTL and parser.RTSLIB_SAVECONFIG == str(SAVECONFIG)


def test_quick_commands_load_no_heavy_module():
    """``evlu --help`` and ``evlu lun list`` stay fast: numpy, PyKMIP, rtslib, the format
    and the volume load only for the commands that use them."""
    probe = textwrap.dedent("""
        import sys
        from gateway.cli.main import build_parser, main
        build_parser().parse_args(["lun", "list"])
        try:
            main(["lun", "list", "--socket", sys.argv[1]])
        except SystemExit as exc:  # gatewayd is not running
            rc = exc.code
        heavy = ("numpy", "kmip", "rtslib_fb", "gateway.format", "gateway.volume", "gateway.kms")
        print(rc, sorted(m for m in sys.modules if m.startswith(heavy)))
    """)
    out = subprocess.run([sys.executable, "-c", probe, "/nonexistent/control.sock"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1) == ["10", "[]\n"], out.stdout + out.stderr


def test_usage_error_exit_2():
    assert evlu("format").returncode == 2
    assert evlu("nonsense").returncode == 2


def test_format_dump_unlock_check(files, capsys):
    fmt_img(files)
    assert "key-A" in capsys.readouterr().out
    assert main(["dump", str(files["img"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bindings"] == [{"token": 0, "keyslots": [0], "key_id": "key-A", "kms": "default"}]
    assert info["copies"] == {"primary": "ok", "secondary": "ok"}
    assert main(["dump", str(files["img"])]) == 0
    assert "key id key-A" in capsys.readouterr().out
    assert main(["unlock-check", str(files["img"]), "--kek-file", str(files["kek"])]) == 0
    assert main(["unlock-check", str(files["img"]), "--kek-file", str(files["kek2"])]) == 4


def test_format_refuses_existing_header_and_data(files, capsys):
    fmt_img(files)
    rc = main(["format", str(files["img"]), "--kek-file", str(files["kek"]),
               "--data-offset", SMALL_OFFSET])
    assert rc == 7 and "--force" in capsys.readouterr().err
    plain = files["img"].with_name("plain")
    plain.write_bytes(b"important" * 1000 + bytes(4 << 20))
    out = evlu("format", str(plain), "--kek-file", str(files["kek"]), "--data-offset", SMALL_OFFSET)
    assert out.returncode == 7 and b"--yes" in out.stderr
    assert plain.read_bytes().startswith(b"important")
    out = evlu("format", str(plain), "--kek-file", str(files["kek"]), "--data-offset",
               SMALL_OFFSET, "--yes")
    assert out.returncode == 0 and b"important" not in plain.read_bytes()


def test_format_layout_errors(files, capsys):
    rc = main(["format", str(files["img"]), "--kek-file", str(files["kek"]), "--data-offset", "1M"])
    assert rc == 2 and "minimum" in capsys.readouterr().err
    tiny = files["img"].with_name("tiny")
    tiny.write_bytes(bytes(1 << 20))
    rc = main(["format", str(tiny), "--kek-file", str(files["kek"])])
    assert rc == 2 and "too small" in capsys.readouterr().err


def test_missing_device_message(files, capsys):
    rc = main(["dump", str(files["img"].with_name("missing"))])
    err = capsys.readouterr().err
    assert rc == 1 and "missing" in err and "check the path" in err


def test_not_an_evlu(files, capsys):
    assert main(["dump", str(files["img"])]) == 3
    assert "not an eVLU" in capsys.readouterr().err


def test_copy_in_copy_out_identical_and_ciphertext_only(files, tmp_path, capsys):
    fmt_img(files)
    src = tmp_path / "src.bin"
    payload = os.urandom(3 * 1024 * 1024 + 777)  # not a multiple of the block size
    src.write_bytes(payload)
    assert main(["copy-in", str(src), str(files["img"]), "--kek-file", str(files["kek"]), "-q"]) == 0
    raw = files["img"].read_bytes()
    for i in range(0, len(payload) - 64, 65536):
        assert payload[i:i + 64] not in raw
    dest = tmp_path / "out.bin"
    assert main(["copy-out", str(files["img"]), str(dest), "--kek-file", str(files["kek"]),
                 "--length", str(len(payload)), "-q"]) == 0
    assert dest.read_bytes() == payload
    whole = tmp_path / "whole.bin"
    assert main(["copy-out", str(files["img"]), str(whole), "--kek-file", str(files["kek"]), "-q"]) == 0
    assert whole.stat().st_size == (8 << 20) - fmt.MIN_DATA_OFFSET
    assert main(["copy-out", str(files["img"]), str(dest), "--kek-file", str(files["kek2"])]) == 4


def test_copy_in_too_large(files, tmp_path, capsys):
    fmt_img(files)
    big = tmp_path / "big"
    big.write_bytes(bytes(9 << 20))
    assert main(["copy-in", str(big), str(files["img"]), "--kek-file", str(files["kek"])]) == 1
    assert "larger device" in capsys.readouterr().err


def test_copy_through_pipes(files):
    fmt_img(files)
    payload = os.urandom(100_000)
    out = evlu("copy-in", "-", str(files["img"]), "--kek-file", str(files["kek"]), stdin=payload)
    assert out.returncode == 0, out.stderr
    out = evlu("copy-out", str(files["img"]), "-", "--kek-file", str(files["kek"]),
               "--length", str(len(payload)))
    assert out.returncode == 0 and out.stdout == payload


def test_copy_in_from_a_pipe_larger_than_the_volume(files):
    fmt_img(files)
    capacity = (8 << 20) - fmt.MIN_DATA_OFFSET
    out = evlu("copy-in", "-", str(files["img"]), "--kek-file", str(files["kek"]),
               stdin=bytes(capacity + 4096))
    assert out.returncode == 1 and b"larger than the volume" in out.stderr


def test_rotate_bind_unbind_off(files, tmp_path, capsys):
    fmt_img(files)
    src = tmp_path / "src"
    src.write_bytes(b"keep me" * 1000)
    main(["copy-in", str(src), str(files["img"]), "--kek-file", str(files["kek"]), "-q"])
    before = hashlib.sha256(files["img"].read_bytes()[fmt.MIN_DATA_OFFSET:]).digest()
    img, kek, kek2, kek3 = (str(files[n]) for n in ("img", "kek", "kek2", "kek3"))
    assert main(["rotate", img, "--kek-file", kek, "--new-kek-file", kek2, "--new-key-id", "key-B"]) == 0
    assert hashlib.sha256(files["img"].read_bytes()[fmt.MIN_DATA_OFFSET:]).digest() == before
    assert main(["unlock-check", img, "--kek-file", kek]) == 4
    assert main(["unlock-check", img, "--kek-file", kek2]) == 0
    assert main(["bind", img, "--kek-file", kek2, "--new-kek-file", kek3, "--new-key-id", "key-DR",
                 "--kms", "dr-site"]) == 0
    assert main(["unlock-check", img, "--kek-file", kek3, "--key-id", "key-DR"]) == 0
    assert main(["unbind", img, "--key-id", "key-B"]) == 0
    assert main(["unbind", img, "--key-id", "key-DR"]) == 7  # never the last binding
    assert "last binding" in capsys.readouterr().err
    dest = tmp_path / "dest"
    assert main(["copy-out", img, str(dest), "--kek-file", kek3, "--length", "7000", "-q"]) == 0
    assert dest.read_bytes() == b"keep me" * 1000
    assert main(["off", img]) == 7
    assert main(["off", img, "--confirm"]) == 0
    assert main(["dump", img]) == 3


def test_check_and_repair(files, capsys):
    fmt_img(files)
    with open(files["img"], "r+b") as f:
        f.seek(4096 + 50)
        f.write(b"\xff\xff")
    assert main(["check", str(files["img"])]) == 5
    assert "--repair" in capsys.readouterr().out
    assert main(["check", str(files["img"]), "--repair"]) == 0
    assert main(["check", str(files["img"])]) == 0
    with open(files["img"], "r+b") as f:  # both copies destroyed
        for off in (100, 0x4000 + 100):
            f.seek(off)
            f.write(b"\xff\xff")
    assert main(["check", str(files["img"])]) == 6


def test_kek_file_permission_warning(files, capsys):
    files["kek"].chmod(0o644)
    fmt_img(files)
    assert "chmod 600" in capsys.readouterr().err


def test_nothing_secret_in_output(files, tmp_path, capsys):
    fmt_img(files)
    main(["dump", str(files["img"]), "--json"])
    main(["unlock-check", str(files["img"]), "--kek-file", str(files["kek"])])
    out = capsys.readouterr()
    kek = files["kek"].read_bytes()
    with open_backstore(str(files["img"])) as dev:
        header = fmt.read(dev).header
        dek = fmt.unlock(dev, header, kek)
    for secret in (kek, bytes(dek)):
        for text in (out.out, out.err):
            assert secret.hex() not in text and secret.hex().upper() not in text
