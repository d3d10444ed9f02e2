"""lio.toml + chap.toml: parsing, precise errors with field paths, secrets, round trips."""

from __future__ import annotations

import os
import textwrap
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from gateway.lio import config as cfg
from gateway.lio.config import ConfigError

IQN = "iqn.2003-01.org.example.gw:db"
HOST = "iqn.1993-08.org.debian:01:host1"
SECRET = "host1-secret-123"
MUTUAL = "gateway-secret-9"

EXAMPLE = f"""
[discovery]
chap = "disc"

[[targets]]
iqn = "{IQN}"

[[targets.tpgs]]
portals = ["0.0.0.0:3260", "[::1]"]
attributes = {{ login_timeout = 15 }}

[[targets.tpgs.luns]]
lun = 0
path = "/var/lib/evlu/db0.img"

[[targets.tpgs.luns]]
lun = 1
path = "/dev/vg0/db1"
block_size = 4096
kms = "default"
serial = "db1-serial"
write_cache = true

[[targets.tpgs.acls]]
initiator = "{HOST}"
chap = "host1"
mapped_luns = [{{ lun = 0 }}, {{ lun = 1, mapped_lun = 5, write_protect = true }}]

[[targets]]
iqn = "iqn.2003-01.org.example.gw:plain"

[[targets.tpgs]]
tag = 2
generate_node_acls = true
demo_mode_write_protect = false
enable = false

[[targets.tpgs.luns]]
lun = 0
path = "/var/lib/evlu/scratch.img"
plain = true
backstore = "scratch"
"""

CHAP = f"""
[host1]
userid = "host1"
password = "{SECRET}"
mutual_userid = "gw"
mutual_password = "{MUTUAL}"

[disc]
userid = "disc"
password = "discovery-secret"
"""


def write(tmp_path: Path, lio: str, chap: str | None = CHAP, mode: int = 0o600) -> Path:
    path = tmp_path / "lio.toml"
    path.write_text(textwrap.dedent(lio))
    if chap is not None:
        secrets = tmp_path / "chap.toml"
        secrets.write_text(chap)
        secrets.chmod(mode)
    return path


def problems(doc: str, credentials: dict[str, cfg.Chap] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        cfg.parse(tomllib.loads(textwrap.dedent(doc)), credentials)
    return info.value.problems


def one_target(tpg: str = "", lun: str = "", acl: str = "") -> str:
    return f"""
        [[targets]]
        iqn = "{IQN}"
        [[targets.tpgs]]
        {tpg}
        [[targets.tpgs.luns]]
        lun = 0
        path = "/var/lib/evlu/a.img"
        {lun}
        [[targets.tpgs.acls]]
        initiator = "{HOST}"
        mapped_luns = [{{ lun = 0 }}]
        {acl}
    """


def test_example_loads_with_defaults(tmp_path: Path) -> None:
    config = cfg.load(write(tmp_path, EXAMPLE))
    db, plain = config.targets
    tpg = db.tpgs[0]
    assert tpg.tag == 1 and [str(p) for p in tpg.portals] == ["0.0.0.0:3260", "[::1]:3260"]
    assert tpg.enforces_auth and not tpg.generate_node_acls and tpg.enable
    assert tpg.attributes == {"login_timeout": 15}
    lun0, lun1 = tpg.luns
    assert (lun0.block_size, lun0.plain, lun0.kms, lun0.write_cache) == (512, False, None, False)
    assert lun0.backstore_name.startswith("db0.img-") and lun0.cfgstring == lun0.path
    assert lun1.block_size == 4096 and lun1.serial == "db1-serial" and lun1.write_cache
    acl = tpg.acls[0]
    assert acl.chap is not None and acl.chap.mutual and acl.chap.password == SECRET
    assert [(m.lun, m.index, m.write_protect) for m in acl.mapped_luns] == [(0, 0, False),
                                                                           (1, 5, True)]
    assert config.discovery is not None and config.discovery.enable
    ptpg = plain.tpgs[0]
    assert ptpg.tag == 2 and not ptpg.enforces_auth and not ptpg.enable
    assert ptpg.luns[0].cfgstring == "/var/lib/evlu/scratch.img;plain"
    assert ptpg.luns[0].backstore_name == "scratch"


def test_default_path_is_in_the_config_dir(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, EXAMPLE)
    monkeypatch.setenv("EVLU_CONFIG_DIR", str(tmp_path))
    assert cfg.load().targets[0].iqn == IQN


def test_secrets_never_in_repr_or_errors(tmp_path: Path) -> None:
    config = cfg.load(write(tmp_path, EXAMPLE))
    for text in (repr(config), str(config), cfg.dump(config)):
        assert SECRET not in text and MUTUAL not in text
    # a bad secret is reported by field, never echoed
    bad = CHAP.replace(SECRET, "short pw")
    with pytest.raises(ConfigError) as info:
        cfg.load(write(tmp_path, EXAMPLE, bad))
    assert "short pw" not in str(info.value)
    assert "host1.password: printable ASCII without white space only" in info.value.problems


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_secrets_file_must_be_private(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, EXAMPLE, mode=mode)
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    assert info.value.source == str(tmp_path / "chap.toml")
    assert f"mode {mode:04o} lets group or others access the CHAP secrets" in str(info.value)
    assert f"chmod 600 {tmp_path / 'chap.toml'}" in str(info.value)


def test_secrets_file_missing_only_matters_when_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chap.toml: 1 problem.*\n  missing"):
        cfg.load(write(tmp_path, EXAMPLE, chap=None))
    no_chap = one_target()
    assert cfg.load(write(tmp_path, no_chap, chap=None)).targets[0].iqn == IQN


def test_secrets_problems(tmp_path: Path) -> None:
    bad = f"""
        [a]
        userid = "a"
        password = "{SECRET}"
        mutual_userid = "gw"
        [b]
        userid = "b"
        password = "{SECRET}"
        mutual_userid = "gw"
        mutual_password = "{SECRET}"
        [c]
        password = "{SECRET}"
        colour = "blue"
        [d]
        userid = "d"
        password = "{'x' * 256}"
    """
    path = tmp_path / "chap.toml"
    path.write_text(textwrap.dedent(bad))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        cfg.load_secrets(path)
    assert info.value.problems == [
        "a.mutual_password: mutual CHAP needs both mutual_userid and mutual_password",
        "b.mutual_password: must differ from password (RFC 7143: one secret per direction)",
        "c.userid: required",
        "c.colour: unknown field",
        "d.password: longer than 255 characters",
    ]


def test_every_problem_is_listed_with_its_field_path() -> None:
    doc = f"""
        [discovery]
        enable = true
        [[targets]]
        iqn = "iqn.2003-01.org.example:t1"
        [[targets.tpgs]]
        tag = 1
        portals = ["gateway.example:3260", "10.0.0.1:70000"]
        authentication = "yes"
        [[targets.tpgs.luns]]
        lun = 0
        path = "relative.img"
        [[targets.tpgs.luns]]
        lun = 0
        path = "/var/lib/evlu/x y.img"
        block_size = 1024
        [[targets.tpgs.acls]]
        initiator = "{HOST}"
        chap = "nobody"
        mapped_luns = [{{ lun = 3 }}, {{ lun = 0, mapped_lun = 300 }}]
        [[targets]]
        iqn = "iqn.2003-01.org.example:T1"
        [[targets.tpgs]]
        [[targets]]
        iqn = "iqn.2003-01.org.example_bad:t2"
        tpg = 1
    """
    t1 = "targets[iqn.2003-01.org.example:t1]"
    acl = f"{t1}.tpgs[1].acls[{HOST}]"
    assert problems(doc, {}) == [
        "discovery.chap: required when enable = true",
        f"{t1}.tpgs[1].portals[0]: 'gateway.example' is not an IP address (LIO listens on "
        "addresses, not names)",
        f"{t1}.tpgs[1].portals[1]: port 70000 out of range",
        f"{t1}.tpgs[1].luns[0].path: must be an absolute path",
        f"{t1}.tpgs[1].luns[0].path: may not contain ',', ':' or white space (the kernel and "
        "rtslib split on them)",
        f"{t1}.tpgs[1].luns[0].block_size: must be 512 or 4096, not 1024",
        f"{t1}.tpgs[1].luns[0]: LUN defined 2 times",
        f"{acl}.mapped_luns[0].lun: no LUN 3 in this TPG",
        f"{acl}.mapped_luns[1].mapped_lun: must be 0 to 255, not 300",
        f"{acl}.chap: no credential 'nobody' in chap.toml",
        f"{t1}.tpgs[1].authentication: must be true or false, not a string",
        "targets[iqn.2003-01.org.example_bad:t2].iqn: not an IQN: use "
        "iqn.YYYY-MM.reversed.domain[:unique], lower case letters, digits, '.', '-' and ':' "
        "(no '_')",
        "targets[iqn.2003-01.org.example_bad:t2].tpgs: required: at least one TPG",
        "targets[iqn.2003-01.org.example_bad:t2].tpg: unknown field",
        f"targets[iqn.2003-01.org.example:t1]: target defined 2 times",
    ]


def test_error_message_lists_everything(tmp_path: Path) -> None:
    path = write(tmp_path, one_target(tpg="tag = 0", acl='chap = "nope"'))
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: 2 problem(s):\n")
    assert f"  targets[{IQN}].tpgs[0].tag: must be 1 to 65535, not 0" in text
    assert f"  targets[{IQN}].tpgs[0].acls[{HOST}].chap: no credential 'nope' in chap.toml" \
        in text


@pytest.mark.parametrize("name, why", [
    ("iqn.2003-13.org.example:x", "not an IQN"),
    ("iqn.03-01.org.example:x", "not an IQN"),
    ("iqn.2003-01.org.example:has space", "not an IQN"),
    ("eui.02004567A425678", "not an EUI-64 name"),
    ("naa.6001405abcdef012", "not an NAA name"),
    ("host1", "not an iSCSI name"),
])
def test_bad_names(name: str, why: str) -> None:
    assert why in (cfg.check_wwn(name.lower()) or "")


@pytest.mark.parametrize("name", [
    "iqn.2003-01.org.linux-iscsi.evlu-appliance:evlu", "iqn.1991-05.com.microsoft:host.dom",
    "iqn.1998-01.com.vmware:esx01-5a2b3c4d", "eui.02004567a425678d", "naa.5001405abcdef012",
    "iqn.2003-01.org.example"])
def test_good_names(name: str) -> None:
    assert cfg.check_wwn(name) is None


def test_names_are_lower_cased() -> None:
    config = cfg.parse(tomllib.loads(one_target().replace(HOST, HOST.upper())))
    assert config.targets[0].tpgs[0].acls[0].initiator == HOST


def test_one_path_one_backstore_one_definition() -> None:
    doc = f"""
        [[targets]]
        iqn = "{IQN}"
        [[targets.tpgs]]
        luns = [{{ lun = 0, path = "/a.img" }}, {{ lun = 1, path = "/a.img", backstore = "x" }},
                {{ lun = 2, path = "/b.img", backstore = "x" }}]
        [[targets]]
        iqn = "iqn.2003-01.org.example.gw:other"
        [[targets.tpgs]]
        luns = [{{ lun = 0, path = "/a.img", block_size = 4096 }}]
    """
    t1, t2 = f"targets[{IQN}].tpgs[1]", "targets[iqn.2003-01.org.example.gw:other].tpgs[1]"
    name = cfg.backstore_name("/a.img")
    assert problems(doc) == [
        f"{t1}.luns[1]: /a.img is also {t1}.luns[0] under backstore {name!r}: one path, "
        "one backstore",
        f"{t1}.luns[2]: backstore 'x' is also {t1}.luns[1] over another path (/a.img)",
        f"{t2}.luns[0]: same backstore as {t1}.luns[0], but its block_size, kms, plain, "
        "serial or write_cache differ",
    ]


def test_same_backstore_in_two_targets_is_fine() -> None:
    lun = '{ lun = 0, path = "/a.img" }'
    doc = f"""
        [[targets]]
        iqn = "{IQN}"
        [[targets.tpgs]]
        luns = [{lun}]
        [[targets]]
        iqn = "iqn.2003-01.org.example.gw:other"
        [[targets.tpgs]]
        luns = [{lun}]
    """
    config = cfg.parse(tomllib.loads(doc))
    assert len({lun.backstore_name for _, lun in config.luns()}) == 1


def test_backstore_names_are_stable_and_lio_safe() -> None:
    a = cfg.backstore_name("/var/lib/evlu/db 0:x.img")
    assert a == cfg.backstore_name("/var/lib/evlu/db 0:x.img")
    assert a.startswith("db_0_x.img-") and len(a) <= 49
    assert cfg.backstore_name("/dev/vg0/db") != cfg.backstore_name("/dev/vg1/db")


def test_path_too_long_for_the_cfgstring() -> None:
    long = "/" + "p" * 250
    assert "too long for a TCMU configuration string" in "\n".join(
        problems(one_target().replace("/var/lib/evlu/a.img", long)))


def test_save_writes_modes_and_round_trips(tmp_path: Path) -> None:
    config = cfg.load(write(tmp_path, EXAMPLE))
    out = tmp_path / "out"
    cfg.save(config, out / "lio.toml")
    assert (out / "lio.toml").stat().st_mode & 0o777 == 0o644
    assert (out / "chap.toml").stat().st_mode & 0o777 == 0o600
    assert SECRET not in (out / "lio.toml").read_text()
    assert cfg.load(out / "lio.toml") == config


def test_save_never_widens_an_existing_secrets_file(tmp_path: Path) -> None:
    config = cfg.load(write(tmp_path, EXAMPLE))
    old_umask = os.umask(0)
    try:
        cfg.save(config, tmp_path / "lio.toml")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "chap.toml").stat().st_mode & 0o777 == 0o600


_names = hs.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


@hs.composite
def configs(draw: hs.DrawFn) -> cfg.LioConfig:
    creds = draw(hs.lists(hs.builds(
        lambda n, mutual: cfg.Chap(n, f"u-{n}", f"secret-{n}-0123",
                                   f"m-{n}" if mutual else "",
                                   f"mutual-{n}-0123" if mutual else ""),
        _names, hs.booleans()), max_size=3, unique_by=lambda c: c.name))
    chap = hs.sampled_from(creds) | hs.none() if creds else hs.none()
    targets = []
    for t in draw(hs.lists(_names, min_size=1, max_size=3, unique=True)):
        tpgs = []
        for tag in draw(hs.lists(hs.integers(1, 4), min_size=1, max_size=2, unique=True)):
            numbers = draw(hs.lists(hs.integers(0, 300), max_size=3, unique=True))
            luns = tuple(cfg.Lun(n, f"/srv/{t}-{tag}-{n}.img", draw(hs.sampled_from((512, 4096))),
                                 draw(hs.sampled_from((None, "default"))), draw(hs.booleans()),
                                 write_cache=draw(hs.booleans()))
                         for n in numbers)
            acls = []
            for i in draw(hs.lists(_names, max_size=2, unique=True)):
                mapped = tuple(cfg.MappedLun(n, None if n <= 255 else n % 256,
                                             draw(hs.booleans()))
                               for n in numbers[:draw(hs.integers(0, len(numbers)))])
                if len({m.index for m in mapped}) == len(mapped):
                    acls.append(cfg.Acl(f"iqn.2024-01.org.example:{i}", draw(chap), mapped,
                                        draw(hs.sampled_from(({}, {"dataout_timeout": 5})))))
            tpgs.append(cfg.Tpg(tag, (cfg.Portal("0.0.0.0"),), luns, tuple(acls),
                                draw(hs.none() | hs.booleans()), draw(hs.booleans()),
                                draw(hs.booleans()), draw(chap), draw(hs.booleans())))
        targets.append(cfg.Target(f"iqn.2024-01.org.example.gw:{t}", tuple(tpgs)))
    discovery = draw(hs.none() | hs.builds(cfg.Discovery, hs.just(False), chap))
    return cfg.LioConfig(tuple(targets), discovery)


@settings(max_examples=60, deadline=None)
@given(configs())
def test_dump_then_load_gives_the_same_config(config: cfg.LioConfig) -> None:
    secrets = tomllib.loads(cfg.dump_secrets(config))
    credentials = {name: cfg.Chap(name, **entry) for name, entry in secrets.items()}
    assert cfg.parse(tomllib.loads(cfg.dump(config)), credentials) == config


def test_evlu_lio_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main
    path = write(tmp_path, EXAMPLE)
    assert main(["lio", "check", "--config-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (f"{path}: valid: 2 target(s), 3 LUN(s), 1 ACL(s), "
                                       "2 CHAP credential(s)\n")
    (tmp_path / "chap.toml").chmod(0o640)
    assert main(["lio", "check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "mode 0640 lets group or others access the CHAP secrets" in err and SECRET not in err
    bad = write(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path,
                one_target(acl="chap = 3"), chap=None)
    assert main(["lio", "check", "--config", str(bad)]) == 2
    assert f"targets[{IQN}].tpgs[1].acls[{HOST}].chap: must be a string, not an integer" \
        in capsys.readouterr().err
