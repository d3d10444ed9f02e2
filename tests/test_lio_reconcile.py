"""The LIO diff and the reconciler on plain data: idempotence, removal, ownership, rollback.

The kernel side is an in-memory LIO (:class:`MemoryLio`) that applies changes
to a :class:`State` the way configfs does (a backstore's removal takes its
LUNs, a LUN's its mapped LUNs) and can be told to fail at one change; the
real rtslib-fb path runs in the VM tier (tests/vm/test_lio.py).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from test_lio_config import HOST, IQN, SECRET, configs

from gateway import format as fmt
from gateway.backstore import open_backstore
from gateway.lio import config as cfg
from gateway.lio import state as st
from gateway.lio.boot import filter_saveconfig
from gateway.lio.reconcile import ApplyError, Backing, PlanError, Reconciler, desired, \
    read_backing
from gateway.lio.state import Auth, Change, Ownership, State

MIB = 1 << 20


# Attributes a new TPG or ACL has in LIO that the reconciler may set later: an update's
# undo restores them (RtsLio observes every attribute).
_LIO_DEFAULTS: dict[type, dict[str, str]] = {
    st.Tpg: {"authentication": "1", "cache_dynamic_acls": "0", "demo_mode_write_protect": "1",
             "generate_node_acls": "0"},
    st.Acl: {"dataout_timeout": "3"},
}


class MemoryLio:
    """LIO as plain data: ``observe`` and ``execute`` like :class:`gateway.lio.rts.RtsLio`."""

    def __init__(self, state: State | None = None) -> None:
        self.state = State(state or {st.Discovery().key: st.Discovery()})
        self.fail_at: int | None = None   # the n-th execute (1-based) raises
        self.fail_undo = False            # and so does every execute after it
        self.executed: list[Change] = []

    def observe(self) -> State:
        return State(self.state)

    def execute(self, change: Change) -> None:
        self.executed.append(change)
        n = len(self.executed)
        if self.fail_at is not None and (n == self.fail_at or self.fail_undo and n > self.fail_at):
            raise OSError(22, f"Invalid argument (step {n})")
        if change.action == "create":
            assert change.obj.key not in self.state, f"exists: {change.obj.key}"
            defaults = _LIO_DEFAULTS.get(type(change.obj))
            if defaults:  # LIO shows every attribute of a new node, set or not
                attributes = defaults | dict(change.obj.attributes)  # type: ignore[attr-defined]
                change = Change("create", replace(change.obj, attributes=tuple(
                    sorted(attributes.items()))))
        else:
            assert change.obj.key in self.state, f"missing: {change.obj.key}"
        if change.action == "delete":   # what LIO removes with the object
            obj = change.obj
            if isinstance(obj, st.Backstore):
                for lun in list(self.state.all(st.Lun)):
                    if (lun.plugin, lun.backstore) == ("user", obj.name):
                        self.execute(Change("delete", lun))
            if isinstance(obj, st.Lun):
                for m in list(self.state.all(st.MappedLun)):
                    if (m.iqn, m.tag, m.tpg_lun) == (obj.iqn, obj.tag, obj.lun):
                        self.execute(Change("delete", m))
        self.state = st.apply_to(self.state, [change])


def backing(path: str, block_size: int) -> Backing:
    """Every store is a 48 MiB eVLU of the LUN's block size, named after its path."""
    return Backing(48 * MIB, block_size, f"uuid-{os.path.basename(path)}", ("default",))


def reconciler(lio: MemoryLio, tmp_path: Path) -> Reconciler:
    return Reconciler(lio, owned_path=tmp_path / "lio-owned.json", read=backing)


def config_of(doc: str, creds: dict[str, cfg.Chap] | None = None) -> cfg.LioConfig:
    return cfg.parse(tomllib.loads(doc), creds)


CHAP = {"host1": cfg.Chap("host1", "host1", SECRET, "gw", "gateway-secret-9")}
BASE = f"""
[[targets]]
iqn = "{IQN}"
[[targets.tpgs]]
luns = [{{ lun = 0, path = "/srv/a.img" }}, {{ lun = 1, path = "/srv/b.img", block_size = 4096 }}]
acls = [{{ initiator = "{HOST}", chap = "host1", mapped_luns = [{{ lun = 0 }}, {{ lun = 1 }}] }}]
"""


def test_desired_state_of_a_config() -> None:
    config = config_of(BASE, CHAP)
    want = desired(config, {lun.backstore_name: backing(lun.path, lun.block_size)
                            for _, lun in config.luns()})
    a, b = (cfg.backstore_name(p) for p in ("/srv/a.img", "/srv/b.img"))
    assert want[("backstore", b)] == st.Backstore(b, "evlu//srv/b.img", 48 * MIB, 4096,
                                                  "uuid-b.img", 2048, -1)
    assert want[("backstore", a)].hw_max_sectors == 16384
    tpg = want[("tpg", IQN, 1)]
    assert dict(tpg.attributes) == {"authentication": "1", "generate_node_acls": "0",
                                    "demo_mode_write_protect": "1"}
    assert want[("acl", IQN, 1, HOST)].auth == Auth("host1", SECRET, "gw", "gateway-secret-9")
    assert ("enable", IQN, 1) in want and ("portal", IQN, 1, "0.0.0.0", 3260) in want
    assert ("discovery",) not in want


def test_apply_from_nothing_in_safe_order_then_nothing_to_do(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    changes = rec.apply(config_of(BASE, CHAP))
    kinds = [c.obj.kind for c in changes]
    assert kinds == ["backstore", "backstore", "target", "tpg", "portal", "lun", "lun", "acl",
                     "mapped_lun", "mapped_lun", "enable"]
    assert all(c.action == "create" for c in changes)
    assert str(changes[-1]) == f"enable tpg {IQN} tpg 1"
    assert rec.plan(config_of(BASE, CHAP)) == []
    assert rec.apply(config_of(BASE, CHAP)) == []


def test_removed_entries_are_removed(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    rec.apply(config_of(BASE, CHAP))
    smaller = f"""
        [[targets]]
        iqn = "{IQN}"
        [[targets.tpgs]]
        luns = [{{ lun = 0, path = "/srv/a.img" }}]
    """
    changes = rec.apply(config_of(smaller))
    b = cfg.backstore_name("/srv/b.img")
    assert [str(c) for c in changes] == [
        f"delete mapped lun {IQN} tpg 1 acl {HOST} mapped lun 0 -> lun 0",
        f"delete mapped lun {IQN} tpg 1 acl {HOST} mapped lun 1 -> lun 1",
        f"delete acl {IQN} tpg 1 acl {HOST}",
        f"delete lun {IQN} tpg 1 lun 1 -> user/{b}",
        f"delete backstore user:evlu/{b} (evlu//srv/b.img, {48 * MIB} bytes, 4096-byte blocks, "
        "serial uuid-b.img)",
        f"update tpg {IQN} tpg 1: attributes authentication 1 -> 0",
    ]
    assert rec.apply(config_of(smaller)) == []
    # removing the target removes everything, backstores included
    changes = rec.apply(cfg.LioConfig())
    assert {c.action for c in changes} == {"delete"}
    assert set(lio.state) == {("discovery",)}
    assert rec.apply(cfg.LioConfig()) == []


def test_foreign_objects_are_left_alone(tmp_path: Path) -> None:
    foreign = [st.Backstore("theirs", "evlu//srv/theirs.img", MIB, 512, "s", 16384, 0),
               st.Target("iqn.2003-01.org.example:admin"),
               st.Tpg("iqn.2003-01.org.example:admin", 1, (("authentication", "0"),)),
               st.Lun("iqn.2003-01.org.example:admin", 1, 0, "theirs"),
               st.Lun("iqn.2003-01.org.example:admin", 1, 1, "disk", "fileio"),
               st.Enable("iqn.2003-01.org.example:admin", 1), st.Discovery()]
    lio = MemoryLio(State.of(foreign))
    rec = reconciler(lio, tmp_path)
    rec.apply(config_of(BASE, CHAP))
    rec.apply(cfg.LioConfig())
    assert lio.state == State.of(foreign)


def test_a_backstore_a_foreign_lun_uses_is_kept_then_removed(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    rec.apply(config_of(BASE, CHAP))
    a = cfg.backstore_name("/srv/a.img")
    admin = st.Lun("iqn.2003-01.org.example:admin", 1, 0, a)
    lio.state[admin.key] = admin   # an admin exported our backstore in their own target
    rec.apply(cfg.LioConfig())
    assert ("backstore", a) in lio.state and admin.key in lio.state
    assert a in rec.owned.load().backstores    # still ours: removed once it is free
    del lio.state[admin.key]
    assert [str(c) for c in rec.apply(cfg.LioConfig())] == [
        f"delete backstore {lio.executed[-1].obj.describe()}"]
    assert ("backstore", a) not in lio.state


def test_a_changed_backstore_is_recreated_with_its_luns_and_mapped_luns(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    rec.apply(config_of(BASE, CHAP))
    a = cfg.backstore_name("/srv/a.img")
    changed = BASE.replace('path = "/srv/a.img" }', 'path = "/srv/a.img", serial = "new" }')
    changes = [str(c) for c in rec.apply(config_of(changed, CHAP))]
    assert changes == [
        f"delete mapped lun {IQN} tpg 1 acl {HOST} mapped lun 0 -> lun 0",
        f"delete lun {IQN} tpg 1 lun 0 -> user/{a}",
        f"delete backstore user:evlu/{a} (evlu//srv/a.img, {48 * MIB} bytes, 512-byte blocks, "
        "serial uuid-a.img)",
        f"create backstore user:evlu/{a} (evlu//srv/a.img, {48 * MIB} bytes, 512-byte blocks, "
        "serial new)",
        f"create lun {IQN} tpg 1 lun 0 -> user/{a}",
        f"create mapped lun {IQN} tpg 1 acl {HOST} mapped lun 0 -> lun 0",
    ]
    assert rec.apply(config_of(changed, CHAP)) == []


def test_a_changed_backstore_a_foreign_lun_uses_is_refused(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    rec.apply(config_of(BASE, CHAP))
    a = cfg.backstore_name("/srv/a.img")
    admin = st.Lun("iqn.2003-01.org.example:admin", 1, 3, a)
    lio.state[admin.key] = admin
    changed = BASE.replace('path = "/srv/a.img" }', 'path = "/srv/a.img", serial = "new" }')
    with pytest.raises(PlanError, match=f"backstore user:evlu/{a} must be re-created, but LUN 3"
                                        " of target iqn.2003-01.org.example:admin"):
        rec.apply(config_of(changed, CHAP))


def test_adopts_an_identical_target_and_fixes_what_differs(tmp_path: Path) -> None:
    config = config_of(BASE, CHAP)
    rec = reconciler(MemoryLio(), tmp_path)
    want = rec._desired(config, Ownership())
    observed = State(want)
    acl = observed[("acl", IQN, 1, HOST)]
    observed[acl.key] = st.Acl(acl.iqn, acl.tag, acl.initiator,
                               (("dataout_timeout", "3"),), Auth("host1", "an-old-secret-1"))
    backstore = observed[("backstore", cfg.backstore_name("/srv/a.img"))]
    observed[backstore.key] = st.Backstore(**{**backstore.__dict__, "nl_reply_supported": 0,
                                              "size": 32 * MIB})
    lio = MemoryLio(observed)
    changes = reconciler(lio, tmp_path).apply(config)
    texts = [str(c) for c in changes]
    assert texts == [
        f"update backstore {backstore.describe()}: size {32 * MIB} -> {48 * MIB}; "
        "nl_reply_supported 0 -> -1",
        f"update acl {IQN} tpg 1 acl {HOST}: auth: CHAP user host1 -> CHAP user host1, "
        "mutual user gw (new secret)",
    ]
    assert all(SECRET not in t and "an-old-secret-1" not in t for t in texts)
    assert SECRET not in repr(changes)
    assert lio.state[acl.key].attributes == (("dataout_timeout", "3"),)  # not ours to reset


def test_write_cache_is_switched_in_place(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    rec.apply(config_of(BASE, CHAP))
    key = ("backstore", cfg.backstore_name("/srv/a.img"))
    cached = BASE.replace('path = "/srv/a.img" }', 'path = "/srv/a.img", write_cache = true }')
    changes = rec.apply(config_of(cached, CHAP))
    assert [(c.action, c.obj.kind) for c in changes] == [("update", "backstore")]
    assert str(changes[0]).endswith(": write_cache False -> True")
    assert lio.state[key].write_cache and "write cache on" in lio.state[key].describe()
    assert rec.apply(config_of(cached, CHAP)) == []
    assert [str(c).split(": ")[-1] for c in rec.apply(config_of(BASE, CHAP))] == [
        "write_cache True -> False"]


def test_discovery_auth_is_owned_once_configured(tmp_path: Path) -> None:
    lio = MemoryLio(State.of([st.Discovery(True, Auth("admin", "admins-secret-1"))]))
    rec = reconciler(lio, tmp_path)
    assert rec.apply(config_of(BASE, CHAP)) != []
    assert lio.state[("discovery",)].enable   # not configured: not ours
    creds = CHAP | {"disc": cfg.Chap("disc", "disc", "discovery-secret")}
    with_discovery = config_of('[discovery]\nchap = "disc"\n' + BASE, creds)
    change, = rec.apply(with_discovery)
    assert str(change) == ("update discovery discovery authentication on (CHAP user disc): "
                           "auth: CHAP user admin -> CHAP user disc (new secret)")
    rec.apply(config_of(BASE, CHAP))
    assert lio.state[("discovery",)] == st.Discovery(False, Auth())


def test_failed_apply_rolls_back_to_the_previous_state(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    rec.apply(config_of(BASE, CHAP))
    before = lio.observe()
    bigger = BASE + f"""
        [[targets]]
        iqn = "iqn.2003-01.org.example.gw:second"
        [[targets.tpgs]]
        luns = [{{ lun = 0, path = "/srv/c.img" }}]
    """
    bigger = bigger.replace(', {{ lun = 1 }}', '')
    plan = rec.plan(config_of(bigger, CHAP))
    lio.fail_at = len(lio.executed) + 4
    with pytest.raises(ApplyError) as info:
        rec.apply(config_of(bigger, CHAP))
    assert lio.observe() == before
    error = info.value
    assert len(error.applied) == 3 and error.rolled_back == error.applied[::-1]
    assert error.failed == plan[3] and not error.stuck
    assert str(error).startswith(f"step 4 of {len(plan)} failed: {plan[3]}: [Errno 22]")
    assert "rolled back: LIO is as it was before this apply" in str(error)
    assert rec.owned.load().targets == {IQN}


def test_rollback_restores_an_attribute_the_update_set_for_the_first_time(
        tmp_path: Path) -> None:
    """Demo mode adds cache_dynamic_acls, which the first apply never set: undoing the
    TPG update puts back the value LIO showed (hypothesis found the case)."""
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    plain_tpg = f'[[targets]]\niqn = "{IQN}"\n[[targets.tpgs]]\n'
    rec.apply(config_of(plain_tpg))
    before = lio.observe()
    demo = config_of(plain_tpg + 'generate_node_acls = true\n'
                                 'luns = [{ lun = 0, path = "/srv/a.img" }]\n')
    plan = rec.plan(demo)
    assert [c.action for c in plan if c.obj.kind == "tpg"] == ["update"]
    lio.fail_at = len(lio.executed) + len(plan)  # the last step fails
    with pytest.raises(ApplyError):
        rec.apply(demo)
    assert lio.observe() == before


def test_failed_rollback_says_exactly_what_is_left(tmp_path: Path) -> None:
    lio = MemoryLio()
    rec = reconciler(lio, tmp_path)
    lio.fail_at, lio.fail_undo = 3, True
    with pytest.raises(ApplyError) as info:
        rec.apply(config_of(BASE, CHAP))
    error = info.value
    assert [c.obj.kind for c, _ in error.stuck] == ["backstore", "backstore"]
    assert "LIO is NOT as it was" in str(error)
    assert all(str(c) in str(error) for c in error.applied)
    assert rec.owned.load().backstores == {o.name for o in lio.state.all(st.Backstore)}
    lio.fail_at = None   # the next apply finishes the job
    assert [c.obj.kind for c in rec.apply(config_of(BASE, CHAP))][0] == "target"


def test_plan_reads_real_evlu_headers(tmp_path: Path) -> None:
    enc, plain, small = tmp_path / "enc.img", tmp_path / "plain.img", tmp_path / "other.img"
    for path, size in ((enc, 8 * MIB), (plain, 3 * MIB + 100), (small, 8 * MIB)):
        path.write_bytes(b"")
        os.truncate(path, size)
    for path, sector, kms in ((enc, 4096, "default"), (small, 512, "dr")):
        dev = open_backstore(str(path))
        header, _ = fmt.create(dev, os.urandom(32), fmt.Binding("k", kms), sector_size=sector,
                               data_offset=fmt.MIN_DATA_OFFSET)
        dev.close()
    assert read_backing(str(enc), 4096) == Backing(8 * MIB - fmt.MIN_DATA_OFFSET, 4096,
                                                   fmt.read(open_backstore(str(enc))).header.uuid,
                                                   ("default",))
    assert read_backing(str(plain), 4096) == Backing(3 * MIB, None, None)
    doc = f"""
        [[targets]]
        iqn = "{IQN}"
        [[targets.tpgs]]
        luns = [{{ lun = 0, path = "{enc}", kms = "default" }},
                {{ lun = 1, path = "{plain}" }},
                {{ lun = 2, path = "{small}", kms = "default" }},
                {{ lun = 3, path = "{tmp_path}/missing.img" }}]
    """
    rec = Reconciler(MemoryLio(), owned_path=tmp_path / "owned.json")
    with pytest.raises(PlanError) as info:
        rec.plan(config_of(doc))
    where = f"targets[{IQN}].tpgs[1]"
    assert info.value.problems == [
        f"{where}.luns[0].block_size: 512, but the eVLU at {enc} has 4096-byte sectors",
        f"{where}.luns[1].path: {plain} has no eVLU header: run 'evlu format {plain} --kms', "
        "or set plain = true to serve it unencrypted",
        f"{where}.luns[2].kms: the eVLU at {small} has no binding in KMS profile 'default' "
        "(it has: dr)",
        f"{where}.luns[3].path: cannot stat {tmp_path}/missing.img: No such file or directory: "
        "check the path, or create the file first",
    ]
    fixed = f"""
        [[targets]]
        iqn = "{IQN}"
        [[targets.tpgs]]
        luns = [{{ lun = 0, path = "{enc}", block_size = 4096, kms = "default" }},
                {{ lun = 1, path = "{plain}", plain = true }}]
    """
    changes = rec.plan(config_of(fixed))
    stores = {c.obj.config: c.obj for c in changes if isinstance(c.obj, st.Backstore)}
    assert stores[f"evlu/{enc}"].block_size == 4096
    assert stores[f"evlu/{plain};plain"].size == 3 * MIB
    again = {c.obj.config: c.obj for c in rec.plan(config_of(fixed))
             if isinstance(c.obj, st.Backstore)}
    assert again == stores   # serials stable, a plain store's too


@settings(max_examples=150, deadline=None)
@given(configs(), configs(), hs.integers(1, 60))
def test_any_config_to_any_other_then_idempotent_or_rolled_back(
        first: cfg.LioConfig, second: cfg.LioConfig, fail_at: int) -> None:
    with TempDir() as tmp:
        lio = MemoryLio()
        rec = reconciler(lio, tmp)
        rec.apply(first)
        assert rec.plan(first) == []
        before = lio.observe()
        lio.fail_at = len(lio.executed) + fail_at
        try:
            rec.apply(second)
        except ApplyError as error:
            assert lio.observe() == before and not error.stuck
            lio.fail_at = None
            rec.apply(second)
        lio.fail_at = None
        assert rec.plan(second) == []
        rec.apply(cfg.LioConfig())
        assert set(lio.state) == {("discovery",)}


class TempDir:
    """A fresh directory per hypothesis example (function-scoped fixtures are shared)."""

    def __enter__(self) -> Path:
        import tempfile
        self._dir = tempfile.TemporaryDirectory()
        return Path(self._dir.name)

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()


def test_boot_restores_everything_but_the_gateways_objects() -> None:
    saved = {
        "storage_objects": [
            {"plugin": "user", "name": "ours", "config": "evlu//srv/a.img"},
            {"plugin": "user", "name": "shared", "config": "evlu//srv/s.img"},
            {"plugin": "user", "name": "admins", "config": "evlu//srv/x.img"},
            {"plugin": "fileio", "name": "ours", "dev": "/srv/f.img"}],
        "targets": [
            {"fabric": "iscsi", "wwn": IQN, "tpgs": [
                {"luns": [{"storage_object": "/backstores/user/ours"}],
                 "node_acls": [{"node_wwn": HOST, "chap_password": SECRET}]}]},
            {"fabric": "iscsi", "wwn": "iqn.2003-01.org.example:admin", "tpgs": [
                {"luns": [{"storage_object": "/backstores/user/shared"},
                          {"storage_object": "/backstores/fileio/ours"}]}]},
            {"fabric": "loopback", "wwn": IQN}],
        "fabric_modules": [{"name": "iscsi", "discovery_enable_auth": True}]}
    owned = Ownership(frozenset({IQN}), frozenset({"ours", "shared"}), discovery=False)
    left = filter_saveconfig(saved, owned)
    assert [so["name"] for so in left["storage_objects"]] == ["shared", "admins", "ours"]
    assert [(t["fabric"], t["wwn"]) for t in left["targets"]] == [
        ("iscsi", "iqn.2003-01.org.example:admin"), ("loopback", IQN)]
    assert SECRET not in str(left) and left["fabric_modules"] == saved["fabric_modules"]
    assert filter_saveconfig(saved, owned | Ownership(discovery=True))["fabric_modules"] == []
    assert saved["targets"][0]["wwn"] == IQN   # the input is left as it was
