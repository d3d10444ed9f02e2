"""The VM tier: one appliance VM for the session, built (or reused) and booted under QEMU.

Every test here is marked `vm`; `pytest -m 'not vm'` runs the native tier only.
A VM that cannot be built or booted is an error of the tier, never a skip.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Generator, Iterator

import pytest
from conftest import REPORT  # tests/conftest.py: the "evlu test report" summary

from appliance.image import BuildError, ensure_image
from appliance.sources import SourcesError
from appliance.vm import GUEST_PORTS, Appliance, choose_accel


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: runs in the appliance VM under QEMU (`pytest -m 'not vm'` skips the tier)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def appliance(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """The booted dev appliance (this tree over 9p); always powered off at the end."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"[appliance] {line}", flush=True)

    start = time.monotonic()
    try:
        image, built = ensure_image(log=say)
    except (BuildError, SourcesError) as exc:
        pytest.fail(f"appliance image: {exc}", pytrace=False)
    manifest = image.manifest
    REPORT.append(
        f"appliance image {image.path.name}: "
        + (f"built in {time.monotonic() - start:.0f} s {manifest['build_seconds']}" if built
           else f"cached (built {manifest['built']} in {manifest['build_seconds']['total']} s)")
        + f"; disk {manifest['disk_used_bytes'] / 2**20:.0f} MiB used"
          f" of {manifest['disk_bytes'] / 2**30:.1f} GiB, kernel {manifest['kernel']}")
    run_dir = tmp_path_factory.mktemp("appliance")
    vm = Appliance(image, run_dir, {name: _free_port() for name in GUEST_PORTS}, dev=True)
    try:
        vm.accel, why = choose_accel(image, os.environ.get("EVLU_QEMU_ACCEL", "auto"), run_dir)
        say(f"booting ({vm.accel}: {why}); serial console: {vm.serial_log}")
        vm.start()
        vm.wait_ready()
        REPORT.append(f"appliance boot ({vm.accel}: {why}): agent after {vm.times.agent} s, "
                      f"ready (systemd running) after {vm.times.ready} s")
        yield vm
    finally:
        stop = time.monotonic()
        how = vm.poweroff()
        REPORT.append(f"appliance power-off: {how} in {time.monotonic() - stop:.1f} s; "
                      f"logs in {run_dir}")
        assert not vm.running, "QEMU still running after power-off"


GUEST_ENV = "set -e; . /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "


@pytest.fixture(scope="session")
def guest_kms(appliance: Appliance) -> str:
    """The guest's embedded KMS, started once for the session: ``evlu kms init`` and
    ``enroll appliance`` in the default config dir (/etc/evlu-gateway), its unit running.
    Returns a shell snippet that gives another config dir the same client setup:
    ``guest_kms.format(dir=DIR)`` (profiles and identity are relative to their dir)."""
    start = time.monotonic()
    appliance.agent.run(GUEST_ENV + """
        mkdir -p /var/lib/evlu
        evlu kms init >/dev/null && evlu kms enroll appliance >/dev/null
        systemctl start evlu-kms
        for i in $(seq 180); do evlu kms status >/dev/null 2>&1 && exit 0; sleep 1; done
        evlu kms status""", timeout=400)
    REPORT.append(f"guest KMS initialised and serving in {time.monotonic() - start:.0f} s")
    return ("mkdir -p {dir} && cp -a /etc/evlu-gateway/gateway.json /etc/evlu-gateway/profiles "
            "/etc/evlu-gateway/gateways {dir}/")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item,
        call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the guest's journal and serial console to a failed VM test's report."""
    report = yield
    vm = getattr(item, "funcargs", {}).get("appliance")
    if report.failed and isinstance(vm, Appliance):
        if vm.running:
            report.sections.append(("guest journal (tail)", vm.journal()))
        report.sections.append(("guest serial console (tail)", vm.serial_tail()))
    return report
