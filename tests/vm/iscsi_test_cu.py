"""Run libiscsi's iscsi-test-cu and read its CUnit XML results per suite."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

#: the SBC/SPC suites of the smoke test (the baseline file holds the same set)
SUITES = ("SCSI.Inquiry", "SCSI.TestUnitReady", "SCSI.ReadCapacity10", "SCSI.ReadCapacity16",
          "SCSI.ModeSense6", "SCSI.Read6", "SCSI.Read10", "SCSI.Read16", "SCSI.Write10",
          "SCSI.Write16", "SCSI.WriteSame10", "SCSI.WriteSame16", "SCSI.Unmap",
          "SCSI.Verify10", "SCSI.CompareAndWrite", "SCSI.GetLBAStatus")


@dataclass
class SuiteResult:
    """Test names of one suite that passed and failed (a test fails on any failed assertion)."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"pass": len(self.passed), "fail": len(self.failed), "failed": self.failed}


def parse(xml: Path, family: str = "SCSI") -> dict[str, SuiteResult]:
    """CUnitAutomated-Results.xml -> {"SCSI.Suite": SuiteResult}."""
    results: dict[str, SuiteResult] = {}
    for suite in ET.parse(xml).getroot().iter("CUNIT_RUN_SUITE_SUCCESS"):
        result = results.setdefault(f"{family}.{suite.findtext('SUITE_NAME', '').strip()}",
                                    SuiteResult())
        for record in suite.iter("CUNIT_RUN_TEST_RECORD"):
            for outcome in record:
                name = outcome.findtext("TEST_NAME", "").strip()
                if outcome.tag == "CUNIT_RUN_TEST_SUCCESS":
                    result.passed.append(name)
                elif name not in result.failed:  # one record per failed assertion
                    result.failed.append(name)
    return results


def run(url: str, workdir: Path, suites: tuple[str, ...] = SUITES,
        timeout: float = 1800) -> dict[str, SuiteResult]:
    """Run the suites (destructive tests allowed) against url; results per suite."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["iscsi-test-cu", "--dataloss", "--xml", f"--test={','.join(suites)}",
                           url], cwd=workdir, capture_output=True, text=True, timeout=timeout)
    (workdir / "iscsi-test-cu.log").write_text(proc.stdout + proc.stderr)
    xml = workdir / "CUnitAutomated-Results.xml"
    if not xml.exists():
        raise RuntimeError(f"iscsi-test-cu wrote no results (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return parse(xml)
