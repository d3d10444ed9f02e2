"""Boot the appliance image under QEMU: accelerator choice, readiness, power-off.

The guest is reached only through 127.0.0.1: user-mode networking with
`restrict=on` (the guest reaches nothing outside) and explicit host
forwards; the guest agent on a virtio-serial unix socket; QMP for power
control. The cached image is never written: the VM's disk is a qcow2 overlay
in its run directory, kept across `reboot()` (a cold one: power-off, then boot
again on the same overlay) and deleted with the run directory. QEMU gets SIGKILL
if the process that started it dies, so no VM outlives its runner.
"""

from __future__ import annotations

import compileall
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.agent_client import AgentClient, AgentError
from appliance.image import REPO, Image, cache_root

QEMU = "qemu-system-x86_64"
#: guest TCP ports forwarded from 127.0.0.1 (the host ports are configurable)
GUEST_PORTS = {"iscsi": 3260, "control": 8080, "metrics": 9100}
AGENT_PORT_NAME = "org.evlu.agent"
SRC_TAG = "evlu-src"
KVM_PROBE_SECONDS = 30.0  # TCG reaches userspace in ~15 s; a slower KVM is no use


def compile_tree() -> None:
    """Byte-compile this tree's Python for a dev guest. The guest mounts the tree read-only
    and cannot cache bytecode in it, and under TCG compiling our modules again costs each
    guest process seconds. The guest's Python (Debian 12's 3.11) uses these files when the
    host's Python is a 3.11 too; otherwise they are only unused."""
    for package in ("gateway", "targetcli_ext", "appliance", "tests"):
        compileall.compile_dir(REPO / package, quiet=1)


class VMError(RuntimeError):
    """QEMU could not start, the guest did not become ready, or did not stop."""


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL QEMU if its parent process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def qemu_version() -> str:
    if shutil.which(QEMU) is None:
        raise VMError(f"{QEMU} not found: run `make system-deps` (package qemu-system-x86)")
    return subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, preexec_fn=_die_with_parent)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _kvm_probe(image: Image, work: Path) -> bool:
    """Does KVM run the guest kernel into userspace (init=/bin/true) in time?"""
    serial = work / "kvm-probe.serial"
    proc = _spawn([QEMU, "-accel", "kvm", "-cpu", "max", "-m", "512", "-display", "none",
                   "-no-reboot", "-snapshot", "-kernel", str(image.kernel),
                   "-initrd", str(image.initrd),
                   "-drive", f"file={image.disk},format=raw,if=virtio",
                   "-append", "root=/dev/vda ro console=ttyS0 init=/bin/true panic=-1",
                   "-serial", f"file:{serial}"], work / "kvm-probe.log")
    deadline = time.monotonic() + KVM_PROBE_SECONDS
    try:
        while time.monotonic() < deadline:
            exited = proc.poll() is not None
            if serial.exists() and b"Attempted to kill init" in serial.read_bytes():
                return True
            if exited:
                return False
            time.sleep(0.5)
        return False
    finally:
        _stop(proc)


def choose_accel(image: Image, wanted: str, work: Path) -> tuple[str, str]:
    """('kvm' or 'tcg', why). auto probes KVM once per host kernel, QEMU and guest kernel."""
    if wanted in ("kvm", "tcg"):
        return wanted, "forced"
    if wanted != "auto":
        raise VMError(f"accelerator must be auto, kvm or tcg, not {wanted!r}")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    record = cache_root() / "kvm-probe.json"
    key = f"{os.uname().release} | {qemu_version()} | {image.manifest['kernel']}"
    known = json.loads(record.read_text()) if record.exists() else {}
    how = f"KVM probe result cached in {record}"
    if key not in known:
        start = time.monotonic()
        known[key] = _kvm_probe(image, work)
        record.write_text(json.dumps(known, indent=2) + "\n")
        how = f"KVM probed in {time.monotonic() - start:.0f} s"
    return ("kvm", f"{how}: it boots") if known[key] else ("tcg", f"{how}: KVM failed")


@dataclass
class BootTimes:
    """Seconds from QEMU start: the agent answers; systemd finished booting."""

    agent: float = 0.0
    ready: float = 0.0


@dataclass
class Appliance:
    """One appliance VM: start, wait_ready, then always poweroff."""

    image: Image
    run_dir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(GUEST_PORTS))
    dev: bool = True  # mount this project tree over 9p (read-only) at /opt/evlu-gateway/src
    accel: str = "tcg"
    memory_mib: int = 2048
    cpus: int = 2
    times: BootTimes = field(default_factory=BootTimes)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.run_dir / "serial.log"
        self.overlay = self.run_dir / "disk.qcow2"
        self.qemu_log = self.run_dir / "qemu.log"
        self.agent = AgentClient(self.run_dir / "agent.sock")
        self._proc: subprocess.Popen | None = None
        self._started = 0.0
        self._agent_answered = False

    def argv(self) -> list[str]:
        forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{self.ports[name]}-:{guest}"
                            for name, guest in GUEST_PORTS.items())
        append = "root=/dev/vda rw console=ttyS0 panic=-1" + (" evlu.src=9p" if self.dev else "")
        argv = [QEMU, "-name", "evlu-appliance", "-accel", self.accel, "-cpu", "max",
                "-m", str(self.memory_mib), "-smp", str(self.cpus),
                "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
                "-append", append,
                "-drive", f"file={self.overlay},format=qcow2,if=virtio",
                "-netdev", f"user,id=n0,restrict=on,{forwards}",
                "-device", "virtio-net-pci,netdev=n0",
                "-device", "virtio-rng-pci",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={self.agent.path},server=on,wait=off",
                "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
                "-qmp", f"unix:{self.run_dir / 'qmp.sock'},server=on,wait=off",
                "-serial", f"file:{self.serial_log}"]
        if self.dev:
            argv += ["-virtfs", f"local,path={REPO},mount_tag={SRC_TAG},"
                                "security_model=none,readonly=on"]
        return argv

    def start(self) -> None:
        qemu_version()
        for stale in ("agent.sock", "qmp.sock"):
            (self.run_dir / stale).unlink(missing_ok=True)
        if not self.overlay.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                            str(self.image.disk), str(self.overlay)], check=True,
                           capture_output=True)
        if self.dev:
            compile_tree()
        self._agent_answered = False
        self._started = time.monotonic()
        self._proc = _spawn(self.argv(), self.qemu_log)
        while not self.agent.path.exists():
            self._check_alive("starting")
            if time.monotonic() - self._started > 30:
                raise VMError(f"QEMU made no agent socket in 30 s:\n{self.qemu_log.read_text()}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def serial_tail(self, lines: int = 60) -> str:
        if not self.serial_log.exists():
            return "(no serial output)"
        text = self.serial_log.read_bytes().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self, phase: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise VMError(f"QEMU exited with {self._proc.returncode} while {phase}:\n"
                          f"{self.qemu_log.read_text(errors='replace')}\n"
                          f"--- serial console (tail) ---\n{self.serial_tail()}")

    def wait_ready(self, timeout: float = 300.0) -> BootTimes:
        """Wait for the agent, then for systemd to finish booting; fail on failed units."""
        deadline = self._started + timeout
        try:
            self.agent.ping(max(1.0, deadline - time.monotonic()))
        except (AgentError, OSError) as exc:
            self._check_alive("booting")
            raise VMError(f"guest not reachable after {timeout:.0f} s: {exc}\n"
                          f"--- serial console (tail) ---\n{self.serial_tail()}") from exc
        self._agent_answered = True
        self.times.agent = round(time.monotonic() - self._started, 1)
        state = self.agent.run(["systemctl", "is-system-running", "--wait"], check=False,
                               timeout=max(1.0, deadline - time.monotonic())).text.strip()
        self.times.ready = round(time.monotonic() - self._started, 1)
        if state != "running":
            failed = self.agent.run(["systemctl", "--failed", "--no-legend", "--plain"],
                                    check=False).text
            raise VMError(f"guest boot ended {state!r} after {self.times.ready} s; "
                          f"failed units:\n{failed}\n{self.journal(lines=80)}")
        return self.times

    def journal(self, lines: int = 300) -> str:
        """The tail of the guest's journal for this boot (for failure reports)."""
        try:
            return self.agent.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic",
                                   "-n", str(lines)], timeout=60, check=False).text
        except (AgentError, OSError) as exc:
            return f"(journal unavailable: {exc})"

    def _qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.run_dir / "qmp.sock"))
            reader = sock.makefile("rb")
            reader.readline()  # greeting
            for execute in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": execute}).encode() + b"\n")
                reader.readline()

    def _wait_exit(self, seconds: float) -> bool:
        assert self._proc is not None
        try:
            self._proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def reboot(self, timeout: float = 300.0) -> str:
        """Power off cleanly, boot again on the same disk; wait until ready. Says how it stopped."""
        how = self.poweroff()
        if how not in ("systemctl poweroff", "already stopped"):
            raise VMError(f"reboot: the guest did not power off cleanly ({how})")
        self.times = BootTimes()
        self.start()
        self.wait_ready(timeout)
        return how

    def poweroff(self, timeout: float = 90.0) -> str:
        """Stop the VM: systemctl poweroff, else ACPI power button, else kill. Says how.

        A guest whose agent never answered is still booting: QEMU is just
        terminated (its disk is a throw-away overlay)."""
        if self._proc is None:
            return "not started"
        how = "already stopped"
        if self._proc.poll() is None and not self._agent_answered:
            how = "terminated while booting"
            self._proc.terminate()
            if not self._wait_exit(10):
                how = "killed while booting"
                _stop(self._proc)
        if self._proc.poll() is None:
            how = "systemctl poweroff"
            try:
                self.agent.run(["systemctl", "poweroff", "--no-block"], timeout=5)
                stopped = self._wait_exit(timeout)
            except (AgentError, OSError):
                stopped = False
            if not stopped:
                how = "ACPI power button (QMP)"
                try:
                    self._qmp("system_powerdown")
                except OSError:
                    pass
                if not self._wait_exit(30):
                    how = "killed"
                    _stop(self._proc)
        self.agent.close()
        return how
