"""gatewayd's LIO side (gateway.daemon.lioconfig): lio.toml as the record of exports.

The reconciler runs against the in-memory LIO of test_lio_reconcile (the real
rtslib path is in the VM tier); the eVLUs are real files with real headers.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from kmsenv import KmsEnv
from test_lio_config import HOST, IQN, SECRET, write
from test_lio_reconcile import MemoryLio

from gateway import format as fmt
from gateway.backstore import open_backstore
from gateway.daemon.daemon import Gatewayd, Options
from gateway.daemon.lioconfig import LioError, LioFile, NoTargetError
from gateway.lio import state as st
from gateway.lio.reconcile import Reconciler

MIB = 1 << 20


def evlu(path: Path, sector_size: int = 512) -> str:
    path.write_bytes(b"")
    os.truncate(path, 24 * MIB)
    dev = open_backstore(str(path))
    try:
        fmt.create(dev, os.urandom(32), fmt.Binding("k1", "default"), sector_size=sector_size,
                   data_offset=fmt.MIN_DATA_OFFSET)
    finally:
        dev.close()
    return str(path)


def lio_file(tmp_path: Path, lio: MemoryLio) -> LioFile:
    return LioFile(tmp_path, Reconciler(lio, owned_path=tmp_path / "lio-owned.json"))


CONFIG = f"""
[[targets]]
iqn = "{IQN}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "{{a}}" }}]
acls = [{{ initiator = "{HOST}", chap = "host1", mapped_luns = [{{ lun = 0 }}] }}]
"""


def test_add_lun_writes_lio_toml_maps_every_acl_and_applies(tmp_path: Path) -> None:
    a, b = evlu(tmp_path / "a.img"), evlu(tmp_path / "b.img", 4096)
    write(tmp_path, CONFIG.replace("{a}", a))
    lio = MemoryLio()
    gw = lio_file(tmp_path, lio)
    assert gw.apply()
    assert gw.apply() == []  # idempotent
    changes = gw.add_lun(b, "b", None)  # the first target by default
    assert any("lun" in c for c in changes)
    doc = tomllib.loads((tmp_path / "lio.toml").read_text())
    tpg = doc["targets"][0]["tpgs"][0]
    assert [(x["lun"], x["block_size"]) for x in tpg["luns"]] == [(0, 512), (1, 4096)]
    assert tpg["acls"][0]["mapped_luns"] == [{"lun": 0}, {"lun": 1}]
    mapped = {(m.initiator, m.mapped_lun, m.tpg_lun) for m in lio.state.all(st.MappedLun)}
    assert (HOST, 1, 1) in mapped
    # The secrets stay in chap.toml, root-only; lio.toml never holds them.
    assert SECRET not in (tmp_path / "lio.toml").read_text()
    assert stat.S_IMODE((tmp_path / "chap.toml").stat().st_mode) == 0o600
    # Adding the same store again (another spelling of its path) changes nothing.
    assert gw.add_lun(str(tmp_path / "." / "b.img"), "b", None) == []
    assert set(gw.configured()) == {a, b}
    assert gw.save() == {"path": str(tmp_path / "lio.toml"), "luns": sorted([a, b])}


def test_add_lun_to_a_new_target_and_without_any(tmp_path: Path) -> None:
    a = evlu(tmp_path / "a.img")
    lio = MemoryLio()
    gw = lio_file(tmp_path, lio)
    assert gw.apply() == []  # no lio.toml: nothing exported, nothing changed
    with pytest.raises(NoTargetError, match="no target"):
        gw.add_lun(a, "a", None)
    with pytest.raises(LioError, match="not an IQN"):
        gw.add_lun(a, "a", "iqn.bad_name")
    assert not (tmp_path / "lio.toml").exists()
    gw.add_lun(a, "a", "iqn.2003-01.org.example.gw:new")
    assert lio.state.all(st.Target)
    assert [t.iqn for t in lio.state.all(st.Target)] == ["iqn.2003-01.org.example.gw:new"]


def test_a_broken_config_is_an_error_that_names_the_field(tmp_path: Path) -> None:
    write(tmp_path, CONFIG.replace("{a}", "relative/path.img"))
    gw = lio_file(tmp_path, MemoryLio())
    with pytest.raises(LioError, match=r"luns\[0\]\.path"):
        gw.apply()
    assert gw.configured() == {}


def test_lun_add_records_the_path_as_given_not_the_one_it_resolves_to(kms: KmsEnv,
                                                                      tmp_path: Path) -> None:
    """/dev/vg/lv -> ../dm-3 today, another dm-N after a reboot: lio.toml keeps /dev/vg/lv."""
    a = evlu(tmp_path / "a.img")
    write(tmp_path, CONFIG.replace("{a}", a))
    link = tmp_path / "vg-lv"
    link.symlink_to(evlu(tmp_path / "dm-3"))
    gw = Gatewayd(Options(config_dir=kms.root, socket=tmp_path / "control.sock", metrics=None,
                          dbus="off", netlink=False, sysfs=tmp_path, configfs=tmp_path),
                  reconciler=lio_file(tmp_path, MemoryLio()))
    try:
        info = gw.api_lun_add({"path": str(link), "wait": 0.0})
    finally:
        gw.luns.close()
    assert info["exported"] and info["name"] == "vg-lv"
    assert info["path"] == str(tmp_path / "dm-3")  # the LUN is its backing store's real path
    luns = tomllib.loads((tmp_path / "lio.toml").read_text())["targets"][0]["tpgs"][0]["luns"]
    assert [x["path"] for x in luns] == [a, str(link)]
