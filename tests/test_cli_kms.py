"""`evlu` with the KMS, as an admin would use it (subprocesses, a real embedded server)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from kmsenv import EVLU, KmsEnv, free_port

from gateway.kms import Config
from gateway.kms.kmip_client import KmipKeyManager


class Shell:
    """Runs evlu commands in a scratch directory and keeps everything they printed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, EVLU_CONFIG_DIR=str(root / "conf"))
        self.env.pop("EVLU_GATEWAY", None)
        self.output: list[str] = []

    def __call__(self, *args: str, gateway: str | None = None, rc: int | None = 0,
                 config: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if gateway:
            env["EVLU_GATEWAY"] = gateway
        if config:
            env["EVLU_CONFIG_DIR"] = str(config)
        result = subprocess.run([*EVLU, *args], env=env, cwd=self.root, capture_output=True,
                                text=True, timeout=120)
        self.output += [result.stdout, result.stderr]
        if rc is not None:
            assert result.returncode == rc, (args, result.stdout, result.stderr)
        return result

    def serve(self, config: Path | None = None) -> subprocess.Popen[bytes]:
        env = dict(self.env, **({"EVLU_CONFIG_DIR": str(config)} if config else {}))
        proc = subprocess.Popen([*EVLU, "kms", "serve"], env=env, cwd=self.root,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "serving KMIP on 127.0.0.1" in line, line
        return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_acceptance_two_gateways_replica_refusal_shred_audit(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    port = free_port()
    sh("kms", "init", "--port", str(port))
    sh("kms", "enroll", "gw-a")
    sh("kms", "enroll", "gw-b")
    server = sh.serve()
    try:
        data = os.urandom(3 << 20)
        (tmp_path / "data").write_bytes(data)
        with open(tmp_path / "img", "wb") as f:
            f.truncate(64 << 20)
        out = sh("format", "img", "--kms", "-q", gateway="gw-a").stdout
        assert "KMS profile embedded" in out
        sh("copy-in", "data", "img", "-q", gateway="gw-a")
        assert data[:65536] not in (tmp_path / "img").read_bytes()
        shutil.copyfile(tmp_path / "img", tmp_path / "img2")
        check = sh("unlock-check", "img2", gateway="gw-b")
        assert "gw-b can unlock it" in check.stdout
        sh("copy-out", "img2", "out", "--length", str(len(data)), "-q", gateway="gw-b")
        assert (tmp_path / "out").read_bytes() == data

        key_id = json.loads(sh("dump", "img", "--json").stdout)["bindings"][0]["key_id"]
        conf = Config(tmp_path / "conf")
        kek = KmipKeyManager(conf.profile(), conf.identity("gw-a")).fetch(key_id)

        # A certificate the perimeter never enrolled: its own CA, same gateway name.
        sh("kms", "init", "--port", str(free_port()), config=tmp_path / "rogue")
        sh("kms", "enroll", "gw-a", config=tmp_path / "rogue")
        sh("kms", "profile", "add", "rogue", "--address", f"127.0.0.1:{port}",
           "--ca", "conf/profiles/embedded-ca.pem", "--cert", "rogue/gateways/gw-a/cert.pem",
           "--key", "rogue/gateways/gw-a/key.pem")
        refused = sh("unlock-check", "img2", "--kms", "rogue", rc=9)
        assert "refused" in refused.stderr and "enrolled" in refused.stderr
        unknown = sh("unlock-check", "img2", gateway="gw-nobody", rc=2)
        assert "not enrolled" in unknown.stderr

        sh("shred", "img", "--yes", gateway="gw-a")
        for gw in ("gw-a", "gw-b"):
            for img in ("img", "img2"):
                gone = sh("unlock-check", img, gateway=gw, rc=9)
                assert "no such key" in gone.stderr
        sh("copy-out", "img2", "-", gateway="gw-b", rc=9)
    finally:
        _stop(server)

    events = [json.loads(x) for x in (tmp_path / "conf/audit.log").read_text().splitlines()]
    seen = {(e["event"], e["outcome"], e["gateway"]) for e in events}
    assert {("enroll", "ok", "gw-a"), ("enroll", "ok", "gw-b"), ("provision", "ok", "gw-a"),
            ("format", "ok", "gw-a"), ("lookup", "granted", "gw-a"),
            ("lookup", "granted", "gw-b"), ("lookup", "refused", "gw-b"),
            ("destroy", "ok", "gw-a")} <= seen
    forms = [kek.hex(), kek.hex().upper(), base64.b64encode(bytes(kek)).decode()]
    logs = [(tmp_path / "conf/audit.log").read_text(), (tmp_path / "conf/kms/server.log").read_text()]
    for text in sh.output + logs:
        for form in forms:
            assert form not in text


def test_rotate_bind_status_via_the_cli(tmp_path: Path) -> None:
    sh = Shell(tmp_path)
    port = free_port()
    sh("kms", "init", "--port", str(port))
    sh("kms", "enroll", "gw-a")
    # A second site's KMS (its own CA) where gw-a is enrolled too: the DR binding.
    dr_conf = tmp_path / "dr"
    sh("kms", "init", "--port", str(free_port()), config=dr_conf)
    sh("kms", "enroll", "gw-a", config=dr_conf)
    dr_port = json.loads((dr_conf / "kms/listen.json").read_text())["port"]
    sh("kms", "profile", "add", "dr", "--address", f"127.0.0.1:{dr_port}", "--ca",
       str(dr_conf / "profiles/embedded-ca.pem"), "--cert", str(dr_conf / "gateways/gw-a/cert.pem"),
       "--key", str(dr_conf / "gateways/gw-a/key.pem"))
    assert "* embedded" in sh("kms", "profile", "list").stdout
    server, dr = sh.serve(), sh.serve(dr_conf)
    try:
        assert "embedded: ok" in sh("kms", "status").stdout
        with open(tmp_path / "img", "wb") as f:
            f.truncate(32 << 20)
        sh("format", "img", "--kms", "-q")
        sh("copy-in", "/etc/os-release", "img", "-q")
        shutil.copyfile(tmp_path / "img", tmp_path / "stale")
        old = json.loads(sh("dump", "img", "--json").stdout)["bindings"][0]["key_id"]
        out = sh("rotate", "img").stdout
        assert "old key deactivated" in out
        bindings = json.loads(sh("dump", "img", "--json").stdout)["bindings"]
        assert [b["key_id"] for b in bindings] != [old]
        sh("unlock-check", "img")
        assert "deactivated" in sh("unlock-check", "stale", rc=9).stderr

        sh("bind", "img", rc=2)  # which KMS? must be said
        sh("bind", "img", "--kms", "dr")
        bindings = json.loads(sh("dump", "img", "--json").stdout)["bindings"]
        assert sorted(b["kms"] for b in bindings) == ["dr", "embedded"]
        dr_key = next(b["key_id"] for b in bindings if b["kms"] == "dr")
        sh("unlock-check", "img", "--kms", "dr", "--key-id", dr_key)
        _stop(server)
        assert "FAILED" in sh("kms", "status", rc=8).stdout
        # The primary KMS is down: the DR binding alone unlocks the volume.
        copy = sh("copy-out", "img", "-", "--length", "4096", "-q")
        assert copy.returncode == 0
        sh("unlock-check", "img", "--kms", "embedded", "--wait", "1", rc=8)
    finally:
        if server.poll() is None:
            _stop(server)
        _stop(dr)


@pytest.mark.parametrize("args", [["kms"], ["kms", "init"], ["kms", "serve"], ["kms", "enroll"],
                                  ["kms", "status"], ["kms", "profile", "add"], ["kms", "cache"],
                                  ["shred"], ["format"], ["unlock-check"], ["rotate"], ["bind"]])
def test_help(args: list[str]) -> None:
    result = subprocess.run([*EVLU, *args, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: evlu" in result.stdout


def test_cache_settings_round_trip(kms: KmsEnv, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(kms.root, conf, ignore=shutil.ignore_patterns("pykmip.db", "*.log"))
    env = dict(os.environ, EVLU_CONFIG_DIR=str(conf))
    run = lambda *a: subprocess.run([*EVLU, "kms", "cache", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True)
    assert "key cache: off" in run("status").stdout
    assert "TTL 60 s" in run("on", "--ttl", "60").stdout
    assert Config(conf).settings().key_cache == {"enabled": True, "ttl": 60.0}
    assert "key cache: off" in run("off").stdout
    assert run("on", "--host-key-file", str(tmp_path / "missing")).returncode == 2
