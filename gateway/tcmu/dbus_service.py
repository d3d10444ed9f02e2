"""The D-Bus face of the handler, so stock targetcli lists and creates ``user:evlu``.

targetcli calls ``GetManagedObjects`` on ``org.kernel.TCMUService1`` (path
``/org/kernel/TCMUService1``), makes a ``user:<subtype>`` node per object
``/org/kernel/TCMUService1/<subtype>`` with its ``ConfigDesc`` property, and
calls ``CheckConfig(s) -> (b, s)`` before creating a backstore.  Two modes:

* standalone (no tcmu-runner): we own ``org.kernel.TCMUService1`` and export
  the ObjectManager and ``/org/kernel/TCMUService1/<subtype>``;
* beside tcmu-runner: we own ``org.kernel.TCMUService1.HandlerManager1.<subtype>``,
  export CheckConfig at ``/org/kernel/TCMUService1/HandlerManager1/<subtype>``
  and call tcmu-runner's ``RegisterHandler(subtype, config_desc)``.

Built on jeepney's blocking connection, served by one thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from jeepney import DBusAddress, HeaderFields, MessageType, new_error, new_method_call, \
    new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

_log = logging.getLogger(__name__)
SERVICE = "org.kernel.TCMUService1"
ROOT = "/org/kernel/TCMUService1"
IFACE = "org.kernel.TCMUService1"
HANDLER_MANAGER = ROOT + "/HandlerManager1"
HANDLER_MANAGER_IFACE = "org.kernel.TCMUService1.HandlerManager1"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
_NAME_FLAG_DO_NOT_QUEUE = 4
_PRIMARY_OWNER = 1

Checker = Callable[[str], tuple[bool, str]]

_HANDLER_XML = f"""<node>
 <interface name="{IFACE}">
  <method name="CheckConfig"><arg type="s" name="config" direction="in"/>
   <arg type="b" name="is_valid" direction="out"/><arg type="s" name="message" direction="out"/>
  </method>
  <property name="ConfigDesc" type="s" access="read"/>
 </interface>
 <interface name="{PROPERTIES}">
  <method name="Get"><arg type="s" direction="in"/><arg type="s" direction="in"/>
   <arg type="v" direction="out"/></method>
  <method name="GetAll"><arg type="s" direction="in"/><arg type="a{{sv}}" direction="out"/>
  </method>
 </interface>
</node>"""


class DbusError(RuntimeError):
    """The bus refused us (name taken, tcmu-runner missing...)."""


class TcmuDbusService:
    """Answers targetcli's questions about one handler subtype."""

    def __init__(self, subtype: str, config_desc: str, check: Checker, *,
                 bus: str = "SYSTEM", beside_runner: bool = False) -> None:
        self.subtype = subtype
        self.config_desc = config_desc
        self.check = check
        self.bus = bus
        self.beside_runner = beside_runner
        base = HANDLER_MANAGER if beside_runner else ROOT
        self.handler_path = f"{base}/{subtype}"
        self.name = f"{SERVICE}.HandlerManager1.{subtype}" if beside_runner else SERVICE
        self._conn: DBusConnection | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> TcmuDbusService:
        """Connect, own the name (and register with tcmu-runner), then serve in a thread."""
        conn = open_dbus_connection(self.bus)
        try:
            reply = conn.send_and_get_reply(message_bus.RequestName(self.name,
                                                                    _NAME_FLAG_DO_NOT_QUEUE))
            if reply.body[0] != _PRIMARY_OWNER:
                raise DbusError(f"D-Bus name {self.name} is taken (tcmu-runner or another "
                                "handler running?)")
            if self.beside_runner:
                self._register(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._thread = threading.Thread(target=self._serve, name="tcmu-dbus", daemon=True)
        self._thread.start()
        return self

    def _register(self, conn: DBusConnection) -> None:
        manager = DBusAddress(HANDLER_MANAGER, bus_name=SERVICE, interface=HANDLER_MANAGER_IFACE)
        reply = conn.send_and_get_reply(new_method_call(manager, "RegisterHandler", "ss",
                                                        (self.subtype, self.config_desc)),
                                        timeout=10)
        if reply.header.message_type == MessageType.error:
            raise DbusError(f"tcmu-runner's RegisterHandler failed: {reply.body}")
        ok, message = reply.body
        if not ok:
            raise DbusError(f"tcmu-runner refused handler {self.subtype}: {message}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None:
            self._conn.close()

    def _serve(self) -> None:
        assert self._conn is not None
        while not self._stop.is_set():
            try:
                msg = self._conn.receive(timeout=0.25)
            except TimeoutError:
                continue
            except OSError:
                _log.exception("D-Bus connection lost")
                return
            if msg.header.message_type != MessageType.method_call:
                continue
            try:
                reply = self._dispatch(msg)
            except Exception as exc:  # noqa: BLE001 - answer the caller, keep serving
                _log.exception("D-Bus call failed")
                reply = new_error(msg, "org.freedesktop.DBus.Error.Failed", "s", (str(exc),))
            self._conn.send(reply)

    def _objects(self) -> dict[str, Any]:
        return {self.handler_path: {IFACE: {"ConfigDesc": ("s", self.config_desc)}}}

    def _dispatch(self, msg: Any) -> Any:
        fields = msg.header.fields
        path, iface = fields.get(HeaderFields.path), fields.get(HeaderFields.interface)
        member = fields.get(HeaderFields.member)
        if member == "Introspect":
            return new_method_return(msg, "s", (self._introspect(path),))
        if path == ROOT and not self.beside_runner and member == "GetManagedObjects" \
                and iface in (OBJECT_MANAGER, None):
            return new_method_return(msg, "a{oa{sa{sv}}}", (self._objects(),))
        if path == self.handler_path:
            if member == "CheckConfig" and iface in (IFACE, None):
                ok, message = self.check(str(msg.body[0]))
                return new_method_return(msg, "bs", (bool(ok), message))
            if iface == PROPERTIES and member == "Get" and tuple(msg.body) == (IFACE,
                                                                               "ConfigDesc"):
                return new_method_return(msg, "v", (("s", self.config_desc),))
            if iface == PROPERTIES and member == "GetAll" and tuple(msg.body) == (IFACE,):
                return new_method_return(msg, "a{sv}", ({"ConfigDesc": ("s",
                                                                        self.config_desc)},))
        return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s",
                         (f"no method {iface}.{member} at {path}",))

    def _introspect(self, path: str | None) -> str:
        if path == self.handler_path:
            return _HANDLER_XML
        children = {ROOT: [] if self.beside_runner else [self.subtype], "/": ["org"],
                    "/org": ["kernel"], "/org/kernel": ["TCMUService1"]}.get(path or "", [])
        if self.beside_runner and path == ROOT:
            children = ["HandlerManager1"]
        if self.beside_runner and path == HANDLER_MANAGER:
            children = [self.subtype]
        manager = (f'<interface name="{OBJECT_MANAGER}"><method name="GetManagedObjects">'
                   '<arg type="a{oa{sa{sv}}}" direction="out"/></method></interface>'
                   if path == ROOT and not self.beside_runner else "")
        nodes = "".join(f'<node name="{c}"/>' for c in children)
        return f"<node>{manager}{nodes}</node>"
