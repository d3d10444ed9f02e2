"""The KMIP key manager against a real embedded PyKMIP server on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kmsenv import KmsEnv, free_port

from gateway.kms import (Address, Config, KeyNotFoundError, KeyRevokedError, KmsConfigError,
                         KmsUnauthorizedError, KmsUnreachableError, KmsUntrustedError, Profile,
                         compat, pki)
from gateway.kms import server as kms_server
from gateway.kms.config import Identity
from gateway.kms.kmip_client import KmipKeyManager


def test_provision_fetch_locate_and_share_within_the_perimeter(kms: KmsEnv) -> None:
    with kms.manager("gw-a") as a, kms.manager("gw-b") as b:
        key_id = a.provision("vol-share")
        kek = a.fetch(key_id)
        assert len(kek) == 32 and any(kek)
        assert b.fetch(key_id) == kek  # another enrolled gateway gets the same KEK
        assert a.state(key_id) == "ACTIVE"
        assert b.find("vol-share") == [key_id]
        assert a.find("no-such-volume") == []
        assert a.health().ok


def test_owner_only_without_the_perimeter_policy(kms: KmsEnv) -> None:
    """PyKMIP's default policy would refuse a second gateway: the policy is what shares keys."""
    enums = compat.load("kmip.core.enums")
    with kms.manager("gw-a") as a, kms.manager("gw-b") as b:
        uid = a._call(lambda c: c.create(enums.CryptographicAlgorithm.AES, 256))
        a._call(lambda c: c.activate(uid))
        assert len(a.fetch(uid)) == 32
        with pytest.raises(KmsUnauthorizedError):
            b.fetch(uid)


def test_deactivated_and_destroyed_keys_are_refused(kms: KmsEnv) -> None:
    with kms.manager("gw-a") as a, kms.manager("gw-b") as b:
        retired, shredded = a.provision("vol-r"), a.provision("vol-d")
        b.deactivate(retired)  # any perimeter gateway may retire a key (rotation elsewhere)
        with pytest.raises(KeyRevokedError, match="deactivated"):
            a.fetch(retired)
        b.destroy(shredded)
        with pytest.raises(KeyNotFoundError):
            a.fetch(shredded)
        with pytest.raises(KeyNotFoundError):
            a.fetch("999999")


def _foreign_identity(tmp_path: Path, name: str = "gw-a") -> Identity:
    """A gateway certificate (same CN as an enrolled one) issued by another CA."""
    ca = pki.make_ca("some other CA")
    pair = pki.issue(ca, name)
    pki.write_pair(pair, tmp_path / "x.pem", tmp_path / "x.key")
    return Identity(name, tmp_path / "x.pem", tmp_path / "x.key")


def test_certificates_the_kms_did_not_enroll_are_refused(kms: KmsEnv, tmp_path: Path) -> None:
    key_id = kms.manager("gw-a").provision("vol-x")
    foreign = KmipKeyManager(kms.config.profile(), _foreign_identity(tmp_path), attempts=1)
    with pytest.raises(KmsUnauthorizedError, match="UNKNOWN_CA"):
        foreign.fetch(key_id)
    # Self-signed impostor with the CN of an enrolled gateway.
    impostor_ca = pki.make_ca("gw-a")
    pki.write_pair(impostor_ca, tmp_path / "i.pem", tmp_path / "i.key")
    impostor = KmipKeyManager(kms.config.profile(),
                              Identity("gw-a", tmp_path / "i.pem", tmp_path / "i.key"), attempts=1)
    with pytest.raises(KmsUnauthorizedError):
        impostor.fetch(key_id)
    # The server's own certificate has no clientAuth usage: refused before connecting.
    files = kms_server.ServerFiles(kms.config.kms_dir)
    server_as_client = KmipKeyManager(kms.config.profile(),
                                      Identity("srv", files.server[0], files.server[1]))
    with pytest.raises(KmsUnauthorizedError, match="clientAuth"):
        server_as_client.fetch(key_id)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the stock client's TLSv1_2
def test_server_host_name_is_verified(tmp_path: Path) -> None:
    """A certificate of the right CA for another host name is refused (PyKMIP alone accepts it)."""
    env = KmsEnv(tmp_path / "conf", gateways=("gw-a",))
    files = kms_server.ServerFiles(env.config.kms_dir)
    ca = pki.load_pair(*files.ca)
    for path in files.server:
        path.unlink()
    pki.write_pair(pki.issue(ca, "evlu-kms", server_names=["kms.invalid"]), *files.server)
    env.start()
    try:
        manager = env.manager("gw-a", attempts=1)
        with pytest.raises(KmsUntrustedError, match="[Hh]ostname|IP address mismatch"):
            manager.provision("vol-h")
        # The gap being closed: PyKMIP's own client connects, checking only the chain.
        client_mod = compat.load("kmip.pie.client")
        identity = env.config.identity("gw-a")
        stock = client_mod.ProxyKmipClient(hostname="127.0.0.1", port=env.port,
                                           cert=str(identity.cert), key=str(identity.key),
                                           ca=str(files.ca[0]), ssl_version="PROTOCOL_TLSv1_2")
        with stock:
            assert stock.locate(maximum_items=1) is not None
    finally:
        env.stop()


def test_failover_to_the_next_address(kms: KmsEnv) -> None:
    dead = free_port()
    profile = kms.config.profile()
    failover = Profile("fo", (Address("127.0.0.1", dead), *profile.addresses), profile.ca)
    with KmipKeyManager(failover, kms.config.identity("gw-a")) as m:
        key_id = m.provision("vol-fo")
        assert len(m.fetch(key_id)) == 32
        assert m.health().address == str(profile.addresses[0])


def test_unreachable_and_silent_servers_are_transient_errors(kms: KmsEnv) -> None:
    identity = kms.config.identity("gw-a")
    ca = kms.config.profile().ca
    refused = Profile("r", (Address("127.0.0.1", free_port()),), ca, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(KmsUnreachableError) as err:
        KmipKeyManager(refused, identity, attempts=3, backoff=0.05).fetch("1")
    assert err.value.transient
    assert time.monotonic() - start < 5
    # A server that accepts TCP and never speaks: the timeout bounds the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = Profile("m", (Address("127.0.0.1", silent.getsockname()[1]),), ca, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(KmsUnreachableError):
            KmipKeyManager(mute, identity, attempts=2, backoff=0.05).fetch("1")
        assert time.monotonic() - start < 5


def test_connection_is_reused(kms: KmsEnv) -> None:
    with kms.manager("gw-a") as m:
        key_id = m.provision("vol-reuse")
        m.fetch(key_id)
        first = m._client
        for _ in range(5):
            m.fetch(key_id)
        assert m._client is first


def test_kms_restart_is_survived_by_a_reused_connection(own_kms: KmsEnv) -> None:
    with own_kms.manager("gw-a", backoff=0.2, attempts=10) as m:
        key_id = m.provision("vol-restart")
        own_kms.stop()
        own_kms.start()
        assert len(m.fetch(key_id)) == 32  # the dead connection is dropped and reopened


def test_serve_stops_promptly_on_sigterm(own_kms: KmsEnv) -> None:
    assert own_kms.stop() < 15
    own_kms.start()  # and the same port comes back


def test_init_and_enroll_files(tmp_path: Path) -> None:
    config = Config(tmp_path)
    files = kms_server.init(config, port=5696, names=["kms.example.org"])
    identity = kms_server.enroll(config, "gw-1")
    assert (files.ca[1].stat().st_mode & 0o777) == 0o600
    assert (identity.key.stat().st_mode & 0o777) == 0o600
    assert "database_path=" + str(files.database) in files.conf.read_text()
    server = pki.load_pair(*files.server).cert
    san = server.extensions.get_extension_for_oid(
        pki.x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert "kms.example.org" in san.get_values_for_type(pki.x509.DNSName)
    assert pki.has_client_auth(pki.load_pair(identity.cert, identity.key).cert)
    assert pki.common_name(pki.load_pair(identity.cert, identity.key).cert) == "gw-1"
    assert config.identity().name == "gw-1"  # the first enrolled gateway is the default
    assert config.profile().addresses == (Address("127.0.0.1", 5696),)
    with pytest.raises(KmsConfigError, match="already enrolled"):
        kms_server.enroll(config, "gw-1")
    with pytest.raises(KmsConfigError, match="already initialised"):
        kms_server.init(config)
    with pytest.raises(KmsConfigError, match="invalid gateway name"):
        kms_server.enroll(config, "../etc")


@pytest.mark.parametrize("text, expected", [
    ("kms1", Address("kms1", 5696)), ("kms1:5697", Address("kms1", 5697)),
    ("[::1]:7000", Address("::1", 7000)), ("10.1.2.3", Address("10.1.2.3", 5696))])
def test_address_parsing(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected


@pytest.mark.parametrize("text", ["", "a:b", "kms:0", "kms:70000", "a:1:2"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(KmsConfigError):
        Address.parse(text)


@pytest.mark.parametrize("doc, message", [
    ([], "not a JSON object"), ({"addresses": []}, "addresses"),
    ({"addresses": ["k"], "ca": 5}, "'ca'"),
    ({"addresses": ["k"], "ca": "c", "cert": "x"}, "both 'cert' and 'key'"),
    ({"addresses": ["k"], "ca": "c", "timeout": -1}, "timeout")])
def test_bad_profiles_are_explained(tmp_path: Path, doc: object, message: str) -> None:
    with pytest.raises(KmsConfigError, match=message):
        Profile.from_json("p", doc, tmp_path)


def test_pykmip_imports_with_deprecations_turned_into_errors() -> None:
    """The compat guard: PyKMIP's server engine works even if cryptography's deprecated
    names raise (simulated with -W error), so a future release cannot break it silently."""
    code = ("from gateway.kms import compat\n"
            "compat.load('kmip.services.server.server')\n"
            "from kmip.services.server.crypto import engine\n"
            "engine.CryptographyEngine()\n"
            "compat.load('kmip.pie.client')\n")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                            text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    bare = subprocess.run([sys.executable, "-c",
                           "import warnings\n"
                           "from cryptography.utils import CryptographyDeprecationWarning as W\n"
                           "warnings.simplefilter('error', W)\n"
                           "from kmip.services.server.crypto import engine\n"
                           "engine.CryptographyEngine()\n"], capture_output=True, text=True)
    assert bare.returncode != 0  # without the guard the same code fails...
    assert "CryptographyDeprecationWarning" in bare.stderr  # ...on a moved cryptography name


def test_tls_context_refuses_old_protocols(kms: KmsEnv) -> None:
    from gateway.kms.kmip_client import tls_context
    ctx = tls_context(kms.config.profile(), kms.config.identity("gw-a"))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_concurrent_fetches_share_one_manager(kms: KmsEnv) -> None:
    with kms.manager("gw-a") as m:
        key_id = m.provision("vol-threads")
        want = m.fetch(key_id)
        got: list[bytearray] = []
        threads = [threading.Thread(target=lambda: got.append(m.fetch(key_id))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [want] * 8
