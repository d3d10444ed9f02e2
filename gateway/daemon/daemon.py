"""gatewayd: the TCMU handler, the key lookup service and the LIO reconciler in one process.

:meth:`Gatewayd.start` opens the KMS side (profiles, identity, audit log,
key cache, lookups), the LUN table, the TCMU handler (D-Bus too), restores
LIO through the reconciler, then starts housekeeping (header watcher, KMS
probe), the metrics endpoint and the control socket, and tells systemd
READY=1.  :meth:`Gatewayd.stop` says STOPPING=1, closes the control socket,
stops fetching ring commands, gives in-flight ones ``stop_timeout`` seconds
to complete (then BUSY), and closes the volumes (their keys are wiped).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from .. import __version__
from ..kms import Config, KmsError
from ..kms.cache import KeyCache
from ..kms.lookup import KeyLookupService
from ..kms.pool import ManagerPool
from ..tcmu import cfgstring
from ..tcmu.dbus_service import DbusError, TcmuDbusService
from ..tcmu.handler import Handler
from ..tcmu.uio import CONFIGFS_CORE, SYSFS_UIO
from ..volume import State
from . import health
from .control import Code, ControlError, Dispatcher, Params
from .luns import LunTable
from .metrics import CountingAuditLog, GatewayCollector, LunSample, Metered
from .notify import notify
from .reconciler import NOT_AVAILABLE, Reconciler
from .server import DEFAULT_SOCKET, ControlServer
from .watcher import HeaderWatcher

_log = logging.getLogger(__name__)


@dataclass
class Options:
    config_dir: Path | None = None
    gateway: str | None = None
    socket: Path = DEFAULT_SOCKET
    metrics: tuple[str, int] | None = ("127.0.0.1", 9561)
    workers: int = 4
    pin_devices: bool = False  # each device's threads on one CPU (RingDevice)
    dbus: str = "standalone"  # standalone, beside-runner, off
    netlink: bool = True
    lio: bool = True  # manage LIO from lio.toml (gateway.daemon.lioconfig)
    sysfs: Path = SYSFS_UIO
    configfs: Path = CONFIGFS_CORE
    watch_interval: float = 10.0
    kms_probe_interval: float = 30.0
    stop_timeout: float = 10.0
    add_wait: float = 10.0  # how long lun.add waits for the key by default


class Gatewayd:
    def __init__(self, options: Options, reconciler: Reconciler | None = None) -> None:
        self.options = options
        self.reconciler = reconciler
        self.started = time.monotonic()
        self.config = Config(options.config_dir)
        self.pool = ManagerPool(self.config, options.gateway)
        self.audit = CountingAuditLog(self.config.audit_path, self.pool.identity_name)
        self.lookups = KeyLookupService(self.pool, audit=self.audit,
                                        cache=KeyCache.from_config(self.config))
        self.luns = LunTable(self.lookups)
        self.handler = Handler(self.lookups, workers=options.workers, pin=options.pin_devices,
                               sysfs=options.sysfs,
                               configfs=options.configfs, volumes=self.luns, wrap=self._meter,
                               beside_runner=options.dbus == "beside-runner")
        self.watcher = HeaderWatcher(self.luns.all, options.watch_interval)
        self.kms_reachable: dict[str, bool] = {}
        self.lio_error: str | None = None
        self._dbus: TcmuDbusService | None = None
        self.dbus_status = "off"
        self._metrics_server: Any = None
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(self._samples, self.audit,
                                                lambda: dict(self.kms_reachable),
                                                lambda: self.health().ready))
        self.control = ControlServer(options.socket, Dispatcher(self._methods(), self._bug))
        self._stopping = threading.Event()
        self._housekeeping: threading.Thread | None = None
        self._beat = time.monotonic()
        self._next_probe = 0.0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Gatewayd:
        self.control.bind()  # first: a second gatewayd must not touch the rings
        self.lookups.start()
        self.handler.start(listen=self.options.netlink)
        if self.options.dbus != "off":
            try:
                self._dbus = TcmuDbusService(cfgstring.SUBTYPE, cfgstring.CONFIG_DESC,
                                             cfgstring.check,
                                             beside_runner=self.options.dbus == "beside-runner"
                                             ).start()
                self.dbus_status = self.options.dbus
            except DbusError as exc:  # serving goes on; only targetcli's listing is missing
                self.dbus_status = f"failed: {exc}"
                _log.error("D-Bus (%s): %s; targetcli will not list user:evlu",
                           self.options.dbus, exc)
        if self.reconciler is not None:
            try:
                self._apply()
            except ControlError:
                pass  # logged; gatewayd runs, not ready, until an apply succeeds
        self._housekeeping = threading.Thread(target=self._housekeep, name="gatewayd-house",
                                              daemon=True)
        self._housekeeping.start()
        if self.options.metrics is not None:
            host, port = self.options.metrics
            self._metrics_server, _ = start_http_server(port, host, self.registry)
        self.control.start()
        notify("READY=1")
        _log.info("gatewayd %s ready: %d LUN(s), control %s, metrics %s", __version__,
                  len(self.luns.all()), self.options.socket,
                  "%s:%d" % self.options.metrics if self.options.metrics else "off")
        return self

    def stop(self) -> None:
        notify("STOPPING=1")
        start = time.monotonic()
        _log.info("gatewayd stopping: in-flight commands get %.0f s", self.options.stop_timeout)
        self._stopping.set()
        self.control.stop()
        if self._housekeeping is not None:
            self._housekeeping.join(5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._dbus is not None:
            self._dbus.stop()
        self.handler.stop(self.options.stop_timeout)
        self.luns.close()
        self.lookups.stop()
        _log.info("gatewayd stopped in %.1f s", time.monotonic() - start)

    def _bug(self, request: str, exc: BaseException) -> None:
        _log.error("control request %r failed", request, exc_info=exc)

    def _meter(self, so_name: str, lu: Any) -> Metered:
        lun = self.luns.by_device(so_name)
        assert lun is not None, f"{so_name} attached without a LUN"
        return Metered(lu, lun.meter)

    def _samples(self) -> list[LunSample]:
        return [LunSample(lun.name, lun.volume.state, lun.meter) for lun in self.luns.all()]

    # -- housekeeping: header watcher, KMS probe -------------------------------------------

    def _housekeep(self) -> None:
        while not self._stopping.is_set():
            self._beat = time.monotonic()
            try:
                if self.watcher.due():
                    self.watcher.tick()
                if time.monotonic() >= self._next_probe:
                    self._next_probe = time.monotonic() + self.options.kms_probe_interval
                    self._probe_kms()
            except Exception:  # noqa: BLE001 - one bad round must not end housekeeping
                _log.exception("housekeeping round failed")
            self._stopping.wait(min(1.0, self.options.watch_interval))

    def _probe_kms(self) -> None:
        for profile in self.config.profile_names():
            try:
                ok = self.pool.get(profile).health().ok
            except KmsError as exc:
                _log.warning("KMS profile %s: %s", profile, exc)
                ok = False
            if self.kms_reachable.get(profile) != ok:
                _log.log(logging.INFO if ok else logging.WARNING, "KMS profile %s %s", profile,
                         "reachable" if ok else "unreachable")
            self.kms_reachable[profile] = ok

    def _apply(self) -> list[str]:
        assert self.reconciler is not None
        try:
            changes = self.reconciler.apply()
        except Exception as exc:  # noqa: BLE001 - reported, and readiness says it
            self.lio_error = f"LIO configuration not applied: {exc}"
            _log.error("%s", self.lio_error)
            raise ControlError(Code.UNUSABLE, self.lio_error) from None
        self.lio_error = None
        for change in changes:
            _log.info("LIO: %s", change)
        return changes

    # -- health ----------------------------------------------------------------------------------

    def health(self) -> health.Health:
        served = list(self.handler.served.values())
        unattached: list[str] = []
        if self.reconciler is not None and self.lio_error is None:
            attached = {lun.path for lun in self.luns.all() if lun.devices}
            unattached = [name for path, name in self.reconciler.configured().items()
                          if os.path.realpath(path) not in attached]
        return health.assess(health.Facts(
            beat_age=time.monotonic() - self._beat,
            beat_limit=max(15.0, 3 * min(1.0, self.options.watch_interval)),
            control_alive=self.control.alive,
            lookups_alive=self.lookups.running,
            broken_devices=[s.device.so_name for s in served if not s.ring.running],
            lio=self.lio_error, unattached=unattached))

    # -- control API -----------------------------------------------------------------------------

    def _methods(self) -> dict[str, Any]:
        return {
            "status": self.api_status, "health": self.api_health, "luns": self.api_luns,
            "lun.info": self.api_lun_info, "lun.add": self.api_lun_add,
            "rescan": self.api_rescan, "apply": self.api_apply, "metrics": self.api_metrics,
            "lun.drop_key": self.api_lun_drop_key, "save": self.api_save,
        }

    def api_status(self, params: dict[str, Any]) -> dict[str, Any]:
        """Version, uptime, health, LUN counts by state, KMS reachability, LIO."""
        Params(params, ())
        states: dict[str, int] = {}
        for lun in self.luns.all():
            states[lun.volume.state.value] = states.get(lun.volume.state.value, 0) + 1
        return {
            "version": __version__, "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 1),
            "gateway": self.pool.identity_name, "health": self.health().to_json(),
            "luns": states, "devices": len(self.handler.served),
            "kms": dict(self.kms_reachable),
            "lio": self.lio_error or ("managed" if self.reconciler else NOT_AVAILABLE),
            "dbus": self.dbus_status,
            "header_checks": self.watcher.rounds,
        }

    def api_health(self, params: dict[str, Any]) -> dict[str, Any]:
        Params(params, ())
        return self.health().to_json()

    def api_luns(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        Params(params, ())
        return [lun.info() for lun in sorted(self.luns.all(), key=lambda lun: lun.name)]

    def api_lun_info(self, params: dict[str, Any]) -> dict[str, Any]:
        lun = self.luns.find(Params(params, ("lun",)).get("lun", str, required=True))
        return lun.info()

    def api_lun_add(self, params: dict[str, Any]) -> dict[str, Any]:
        """Read the header, look the key up (waiting up to ``wait`` s), export through LIO."""
        p = Params(params, ("path", "target", "name", "plain", "wait"))
        path = p.get("path", str, required=True)
        wait = p.get("wait", float, self.options.add_wait)
        lun = self.luns.add(path, name=p.get("name", str), target=p.get("target", str),
                            plain=p.get("plain", bool, False))
        _log.info("%s: added %s (%s)", lun.name, lun.path, lun.volume.state.value,
                  extra={"lun": lun.name})
        deadline = time.monotonic() + max(0.0, wait)
        while lun.volume.state == State.WAITING_FOR_KEY and time.monotonic() < deadline:
            time.sleep(0.02)
        info = lun.info()
        if self.reconciler is None:
            info["exported"], info["lio"] = False, NOT_AVAILABLE
            return info
        try:  # the path as given: /dev/vg/lv, not the /dev/dm-N it resolves to today
            info["lio"] = self.reconciler.add_lun(path, lun.name, lun.target)
        except LookupError as exc:  # nowhere to export it: served, and said so
            info["exported"], info["lio"] = False, str(exc)
            return info
        except RuntimeError as exc:
            raise ControlError(Code.UNUSABLE, f"{lun.name} is served but not exported: "
                                              f"{exc}") from None
        info["exported"] = True
        return info

    def api_rescan(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Re-read the metadata of one LUN (``lun``: name or path) or of all."""
        p = Params(params, ("lun", "accept_plain"))
        what = p.get("lun", str)
        luns = [self.luns.find(what)] if what else self.luns.all()
        out = []
        for lun in luns:
            transition = lun.volume.rescan(accept_plain=p.get("accept_plain", bool, False))
            if transition is not None:
                _log.info("%s: rescan: %s", lun.name, transition, extra={"lun": lun.name})
            out.append({"lun": lun.name, "state": lun.volume.state.value,
                        "transition": str(transition) if transition else None})
        return out

    def api_lun_drop_key(self, params: dict[str, Any]) -> dict[str, Any]:
        """Forget the key a LUN was unlocked with (its KEK was just destroyed or revoked,
        e.g. by 'evlu shred'): NO_KEY (DATA PROTECT) at once, not at the next restart, for
        that LUN and every other one unlocked by the same key (its replicas)."""
        p = Params(params, ("lun", "reason"))
        lun = self.luns.find(p.get("lun", str, required=True))
        key_id = lun.volume.unlocked_by
        if key_id is not None:
            reason = p.get("reason", str, f"key {key_id} withdrawn by the administrator")
            for other in self.luns.all():
                if other.volume.unlocked_by == key_id:
                    other.volume.withdraw_key(key_id, reason)
                    _log.info("%s: key %s dropped: %s", other.name, key_id, reason,
                              extra={"lun": other.name})
        return lun.info()

    def api_apply(self, params: dict[str, Any]) -> list[str]:
        """Make LIO match its configuration again."""
        Params(params, ())
        if self.reconciler is None:
            raise ControlError(Code.UNAVAILABLE, NOT_AVAILABLE)
        return self._apply()

    def api_save(self, params: dict[str, Any]) -> dict[str, Any]:
        """Persist the exported LUNs (the LIO configuration); ``not_saved``: LUNs served
        but not in it (they are gone after a restart)."""
        Params(params, ())
        if self.reconciler is None:
            raise ControlError(Code.UNAVAILABLE, NOT_AVAILABLE)
        saved = self.reconciler.save()
        configured = {os.path.realpath(p) for p in self.reconciler.configured()}
        saved["not_saved"] = sorted(lun.name for lun in self.luns.all()
                                    if os.path.realpath(lun.path) not in configured)
        return saved

    def api_metrics(self, params: dict[str, Any]) -> str:
        """The Prometheus exposition text (as the metrics endpoint serves it)."""
        Params(params, ())
        return generate_latest(self.registry).decode()
