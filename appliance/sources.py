"""Debian package sources for the image, taken from the build machine.

The mirror is never named in the repository: it comes from the machine's own
apt configuration (deb822 `*.sources` and one-line `*.list` files), or from
EVLU_DEBIAN_MIRROR (plus EVLU_DEBIAN_SECURITY_MIRROR) when set. Only the
bookworm suites are kept, so third-party repositories never reach the image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SUITES = ("bookworm", "bookworm-updates", "bookworm-security")
#: one-line `[option=value]` names and their deb822 field names
ONE_LINE_OPTIONS = {"arch": "Architectures", "signed-by": "Signed-By", "trusted": "Trusted"}
APT_DIR = Path("/etc/apt")


class SourcesError(RuntimeError):
    """No usable Debian bookworm source on this machine."""


@dataclass(frozen=True)
class Source:
    """One `deb` entry: URIs x suites x components, with its apt options."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    options: dict[str, str] = field(default_factory=dict, hash=False)

    def deb822(self) -> str:
        lines = ["Types: deb", f"URIs: {' '.join(self.uris)}",
                 f"Suites: {' '.join(self.suites)}",
                 f"Components: {' '.join(self.components)}"]
        for key, value in self.options.items():
            body = value.replace("\n", "\n ")  # continuation lines (an inline key)
            lines.append(f"{key}: {body}")
        return "\n".join(lines) + "\n"


def parse_deb822(text: str) -> list[Source]:
    """The `deb` paragraphs of a deb822 sources file."""
    sources = []
    for paragraph in _paragraphs(text):
        fields = {k.lower(): (k, v) for k, v in paragraph.items()}
        types = fields.get("types", ("", ""))[1].split()
        if "deb" not in types or fields.get("enabled", ("", "yes"))[1].lower() == "no":
            continue
        options = {k: v for low, (k, v) in fields.items()
                   if low not in ("types", "uris", "suites", "components", "enabled")}
        sources.append(Source(tuple(fields.get("uris", ("", ""))[1].split()),
                              tuple(fields.get("suites", ("", ""))[1].split()),
                              tuple(fields.get("components", ("", ""))[1].split()),
                              options))
    return sources


def _paragraphs(text: str) -> list[dict[str, str]]:
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                paragraphs.append(current)
            current, last = {}, ""
        elif raw[0] in " \t" and last:
            current[last] += "\n" + raw.strip()
        elif ":" in raw:
            last, value = (part.strip() for part in raw.split(":", 1))
            current[last] = value
    return paragraphs


def parse_one_line(text: str) -> list[Source]:
    """The `deb` lines of a one-line sources.list file."""
    sources = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        options: dict[str, str] = {}
        if words[1].startswith("["):
            end = next(i for i, w in enumerate(words) if w.endswith("]"))
            for opt in " ".join(words[1:end + 1]).strip("[]").split():
                key, _, value = opt.partition("=")
                options[ONE_LINE_OPTIONS.get(key, key)] = value
            words = [words[0]] + words[end + 1:]
        sources.append(Source((words[1],), (words[2],), tuple(words[3:]), options))
    return sources


def machine_sources(apt_dir: Path = APT_DIR) -> list[Source]:
    """All `deb` entries configured on this machine."""
    sources = []
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if path.is_file():
            sources += parse_one_line(path.read_text())
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        sources += parse_deb822(path.read_text())
    return sources


def bookworm_sources(apt_dir: Path = APT_DIR) -> str:
    """The deb822 sources text the image is built from (bookworm suites, main)."""
    mirror = os.environ.get("EVLU_DEBIAN_MIRROR")
    if mirror:
        chosen = [Source((mirror,), ("bookworm", "bookworm-updates"), ("main",))]
        security = os.environ.get("EVLU_DEBIAN_SECURITY_MIRROR")
        if security:
            chosen.append(Source((security,), ("bookworm-security",), ("main",)))
    else:
        chosen = []
        for source in machine_sources(apt_dir):
            suites = tuple(s for s in source.suites if s in SUITES)
            if suites and "main" in source.components:
                chosen.append(Source(source.uris, suites, ("main",), source.options))
    if not any("bookworm" in s.suites for s in chosen):
        raise SourcesError(
            f"no Debian bookworm 'main' source in {apt_dir}/sources.list(.d); "
            "set EVLU_DEBIAN_MIRROR to a Debian mirror URL")
    return "\n".join(s.deb822() for s in chosen)
