"""docs/walkthrough.md, the admin walkthrough, runs in the appliance exactly as printed.

Every ``console`` block of the document is a transcript: ``# `` starts a
command, ``> `` continues it, other lines are its output.  The commands run in
the guest in order, as root, through a login-like shell; each must succeed.
The initiators the walkthrough names log in from the host with the CHAP it
configures.  ``EVLU_UPDATE_WALKTHROUGH=1`` writes this run's outputs into the
document, so its transcript is always a real one.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPORT

from appliance.vm import Appliance

pytestmark = pytest.mark.vm

DOC = Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"
ENV = ". /etc/default/evlu-gateway; export PATH PYTHONPATH PYTHONDONTWRITEBYTECODE; "
PROD, DR = "iqn.2003-01.org.example.gw:prod", "iqn.2003-01.org.example.gw:dr"
DB_HOST, DR_HOST = "iqn.2024-01.org.example:db-host", "iqn.2024-01.org.example:dr-host"
CHAP, MUTUAL = ("db-host", "walkthrough-secret-1"), ("gw-prod", "walkthrough-secret-2")


@dataclass
class Step:
    command: str
    output: list[str] = field(default_factory=list)


@dataclass
class Block:
    start: int  # line index of the first line inside the fence
    end: int  # line index of the closing fence
    steps: list[Step] = field(default_factory=list)


def parse(lines: list[str]) -> list[Block]:
    blocks, block = [], None
    for i, line in enumerate(lines):
        if block is None:
            if line.strip() == "```console":
                block = Block(i + 1, -1)
            continue
        if line.strip() == "```":
            block.end = i
            blocks.append(block)
            block = None
        elif line.startswith("# "):
            block.steps.append(Step(line[2:]))
        elif line.startswith("> ") or line == ">":
            block.steps[-1].command += "\n" + line[2:]
        else:
            block.steps[-1].output.append(line)
    assert block is None, "unclosed console block"
    return blocks


def initiator(vm: Appliance, iqn: str, lun: int, name: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LIBISCSI_CHAP_TARGET_USERNAME=MUTUAL[0],
               LIBISCSI_CHAP_TARGET_PASSWORD=MUTUAL[1])
    return subprocess.run(["iscsi-readcapacity16", "-i", name,
                           f"iscsi://{CHAP[0]}%{CHAP[1]}@127.0.0.1:{vm.ports['iscsi']}/{iqn}/{lun}"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_walkthrough_runs_as_printed(appliance: Appliance, guest_kms: str) -> None:
    lines = DOC.read_text().splitlines()
    blocks = parse(lines)
    commands = [s.command for b in blocks for s in b.steps]
    assert any("shred" in c for c in commands) and len(commands) > 15
    appliance.agent.run(["mkdir", "-p", "/var/lib/evlu"])
    try:
        for block in blocks:
            for step in block.steps:
                result = appliance.agent.run(["bash", "-c", ENV + "exec 2>&1\n" + step.command],
                                             timeout=300, check=False)
                output = result.text.rstrip("\n")
                assert result.rc == 0, f"walkthrough command failed ({result.rc}):\n" \
                                       f"# {step.command}\n{output}"
                step.output = output.splitlines() if output else []
                if step.command.startswith("targetcli-evlu /encryption create"):
                    got = initiator(appliance, PROD, 0, DB_HOST)
                    assert got.returncode == 0 and "Total size:" in got.stdout, got.stderr
                if step.command.startswith("evlu lun add"):
                    got = initiator(appliance, DR, 0, DR_HOST)
                    assert got.returncode == 0, got.stderr
                    wrong = subprocess.run(
                        ["iscsi-inq", "-i", DR_HOST, f"iscsi://{CHAP[0]}%wrong-secret-000@"
                                                     f"127.0.0.1:{appliance.ports['iscsi']}/{DR}/0"],
                        capture_output=True, text=True, timeout=60)
                    assert wrong.returncode != 0, "a wrong CHAP secret logged in"
        final = blocks[-1].steps[1].output  # gatewayd serves other modules' LUNs too
        states = {line.split()[0]: line.split()[1] for line in final[1:] if line.strip()}
        assert states["db0"] == states["db0-replica"] == "NO_KEY", final
        got = initiator(appliance, PROD, 0, DB_HOST)
        assert got.returncode != 0 and re.search(r"DATA.PROTECT|ACCESS.DENIED|protect",
                                                 got.stderr + got.stdout, re.I), got
    finally:
        appliance.agent.run(["bash", "-c", ENV + """
            systemctl stop evlu-gatewayd
            rm -f /etc/evlu-gateway/gatewayd.conf /etc/evlu-gateway/lio.toml \\
                  /etc/evlu-gateway/chap.toml /etc/evlu-gateway/lio-owned.json
            targetcli clearconfig confirm=True
            rm -f /var/lib/evlu/db0.img /var/lib/evlu/db0-replica.img"""],
            timeout=180, check=False)
    REPORT.append(f"walkthrough: {len(commands)} commands of {DOC.name} ran as printed")
    if os.environ.get("EVLU_UPDATE_WALKTHROUGH"):
        for block in reversed(blocks):
            body = []
            for step in block.steps:
                first, *rest = step.command.split("\n")
                body += [f"# {first}"] + [f"> {line}" for line in rest] + step.output
            lines[block.start:block.end] = body
        DOC.write_text("\n".join(lines) + "\n")
