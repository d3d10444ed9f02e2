"""The D-Bus service targetcli talks to, on a private dbus-daemon.

targetcli's own D-Bus library (dbus-python, Debian's python3-dbus, run with
the system interpreter) lists the handler and calls CheckConfig, the way
``targetcli``'s ``UIBackstores`` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from jeepney import DBusAddress, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from gateway import format as fmt
from gateway.backstore import FileBackstore
from gateway.tcmu import cfgstring
from gateway.tcmu.dbus_service import (HANDLER_MANAGER, ROOT, SERVICE, DbusError,
                                       TcmuDbusService)

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    """A private message bus (session policy: any name may be owned)."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.fail("dbus-daemon is missing: install Debian's dbus-daemon (make test does)")
    proc = subprocess.Popen([daemon, "--session", "--nofork", "--print-address"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def evlu_file(tmp_path: Path) -> Path:
    path = tmp_path / "lun.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    dev = FileBackstore(str(path))
    fmt.create(dev, os.urandom(32), fmt.Binding("42", "embedded"), data_offset=fmt.MIN_DATA_OFFSET)
    dev.close()
    return path


def call(address: str, path: str, iface: str, member: str, sig: str | None = None,
         body: tuple = (), name: str = SERVICE) -> tuple:
    with open_dbus_connection(address) as conn:
        reply = conn.send_and_get_reply(
            new_method_call(DBusAddress(path, bus_name=name, interface=iface), member, sig, body),
            timeout=5)
    return tuple(reply.body)


def test_standalone_service_as_targetcli_sees_it(bus: str, evlu_file: Path) -> None:
    svc = TcmuDbusService("evlu", cfgstring.CONFIG_DESC, cfgstring.check, bus=bus).start()
    try:
        # What targetcli does (ui_backstore.py), with its own library.
        script = textwrap.dedent(f"""
            import dbus
            bus = dbus.bus.BusConnection({bus!r})
            mgr = dbus.Interface(bus.get_object('org.kernel.TCMUService1',
                                 '/org/kernel/TCMUService1'),
                                 'org.freedesktop.DBus.ObjectManager')
            for path, ifaces in mgr.GetManagedObjects().items():
                desc = ifaces['org.kernel.TCMUService1']['ConfigDesc']
                handler = dbus.Interface(bus.get_object('org.kernel.TCMUService1', path),
                                         'org.kernel.TCMUService1')
                print(path.split('/')[-1], '|', desc)
                for cfg in ('evlu/{evlu_file}', 'evlu/{evlu_file}.missing', 'evlu/relative'):
                    ok, msg = handler.CheckConfig(cfg)
                    print(bool(ok), '|', msg)
        """)
        out = subprocess.run([SYSTEM_PYTHON, "-c", script], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == f"evlu | {cfgstring.CONFIG_DESC}"
        assert lines[1].startswith("True |") and "key id(s) 42 (embedded)" in lines[1]
        assert lines[2].startswith("False |") and "No such file" in lines[2]
        assert lines[3].startswith("False |") and "absolute path" in lines[3]
        # Properties and introspection, with jeepney.
        (value,) = call(bus, f"{ROOT}/evlu", "org.freedesktop.DBus.Properties", "Get", "ss",
                        ("org.kernel.TCMUService1", "ConfigDesc"))
        assert value == ("s", cfgstring.CONFIG_DESC)
        (xml,) = call(bus, ROOT, "org.freedesktop.DBus.Introspectable", "Introspect")
        assert '<node name="evlu"/>' in xml and "GetManagedObjects" in xml
    finally:
        svc.stop()


def test_plain_stores_need_the_plain_option(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1 << 20))
    ok, msg = cfgstring.check(f"evlu/{plain}")
    assert not ok and "evlu format" in msg and ";plain" in msg
    ok, msg = cfgstring.check(f"evlu/{plain};plain")
    assert ok and "unencrypted" in msg
    assert cfgstring.check(f"{plain};bogus") == (False, "unknown option(s) bogus; only 'plain' "
                                                        "is known")
    assert not cfgstring.check("evlu//tmp/a,b")[0]
    assert not cfgstring.check("evlu/" + "/x" * 200)[0]


def test_name_taken_is_a_clear_error(bus: str) -> None:
    first = TcmuDbusService("evlu", "d", cfgstring.check, bus=bus).start()
    try:
        with pytest.raises(DbusError, match="taken"):
            TcmuDbusService("evlu", "d", cfgstring.check, bus=bus).start()
    finally:
        first.stop()


def test_beside_tcmu_runner_registers_and_answers_check_config(bus: str,
                                                               evlu_file: Path) -> None:
    """Against a stand-in for tcmu-runner's HandlerManager1 (the real one runs in the VM)."""
    from jeepney import HeaderFields, MessageType, new_method_return
    import threading
    registered: list[tuple] = []
    checked: list[tuple] = []
    runner = open_dbus_connection(bus)
    runner.send_and_get_reply(message_bus.RequestName(SERVICE, 4))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                msg = runner.receive(timeout=0.2)
            except TimeoutError:
                continue
            if msg.header.message_type == MessageType.method_call and \
                    msg.header.fields.get(HeaderFields.member) == "RegisterHandler":
                registered.append(tuple(msg.body))
                runner.send(new_method_return(msg, "bs", (True, "")))
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        svc = TcmuDbusService("evlu", cfgstring.CONFIG_DESC, cfgstring.check, bus=bus,
                              beside_runner=True).start()
        try:
            assert registered == [("evlu", cfgstring.CONFIG_DESC)]
            checked.append(call(bus, f"{HANDLER_MANAGER}/evlu", "org.kernel.TCMUService1",
                                "CheckConfig", "s", (f"evlu/{evlu_file}",),
                                name=f"{SERVICE}.HandlerManager1.evlu"))
            assert checked[0][0] is True
        finally:
            svc.stop()
    finally:
        stop.set()
        thread.join()
        runner.close()
