"""The appliance image: cache key, cache, and build.

Build: the project's wheels (host pip) -> `mmdebstrap --variant=minbase` tree
with the packages of packages.txt -> customize.sh (overlay, offline venv,
units) -> kernel and initrd copied out -> `mkfs.ext4 -d` raw root disk.

Images are cached outside the clone, one directory per key, in
EVLU_APPLIANCE_CACHE (default /var/cache/evlu-gateway/appliance). The key of the
dev image covers the recipe, the package list, the Debian sources and the
project's dependency declarations; the project's code reaches the dev VM over
9p, so editing it needs no rebuild. The release image's key adds the code.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.sources import bookworm_sources

REPO = Path(__file__).resolve().parent.parent
APPLIANCE = REPO / "appliance"
DEFAULT_CACHE = Path("/var/cache/evlu-gateway/appliance")
SUITE = "bookworm"
GUEST_PYTHON = (3, 11)  # bookworm's python3: the host builds wheels for it
DISK_SIZE = "3G"  # sparse; about 1 GiB is used
KEEP_IMAGES = 3  # cache entries kept (most recently used first)

RECIPE = ("appliance/packages.txt", "appliance/customize.sh", "appliance/image.py",
          "appliance/sources.py", "appliance/rootfs")
DEPENDENCIES = ("setup.cfg", "pyproject.toml")
CODE = ("README.md", "gateway", "targetcli_ext")  # what else the project wheel holds
# mmdebstrap: leave documentation and translations out of the image
DPKG_EXCLUDES = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                 "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/doc/*",
                 "path-include=/usr/share/doc/*/copyright")

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The image could not be built (the message says which step and why)."""


@dataclass(frozen=True)
class Image:
    """A built image in the cache."""

    path: Path

    @property
    def disk(self) -> Path:
        return self.path / "disk.raw"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())


def cache_root() -> Path:
    return Path(os.environ.get("EVLU_APPLIANCE_CACHE", DEFAULT_CACHE))


def packages() -> list[str]:
    lines = (APPLIANCE / "packages.txt").read_text().splitlines()
    return [w for w in (line.split("#", 1)[0].strip() for line in lines) if w]


def _files(rel: str) -> Iterator[Path]:
    path = REPO / rel
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts)
    elif path.is_file():
        yield path


def dependency_declarations() -> str:
    """What decides the venv's contents: build and install requirements, entry points
    (other setup.cfg edits, such as pytest settings or comments, need no rebuild)."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / "setup.cfg")
    lines = [(REPO / "pyproject.toml").read_text()]
    for section, option in (("options", "python_requires"), ("options", "install_requires"),
                            ("options.entry_points", "console_scripts")):
        lines.append(f"[{section}] {option} = {cfg.get(section, option, fallback='')}")
    return "\n".join(lines) + "\n"


def cache_key(release: bool, sources: str) -> str:
    """sha256 of everything the image is made from (24 hex digits)."""
    digest = hashlib.sha256()
    digest.update(f"flavour={'release' if release else 'dev'}\n".encode())
    digest.update(f"python=cp{GUEST_PYTHON[0]}{GUEST_PYTHON[1]}\n".encode())
    digest.update(sources.encode())
    digest.update(dependency_declarations().encode())
    for rel in RECIPE + ((DEPENDENCIES + CODE) if release else ()):
        for path in _files(rel):
            mode = "x" if os.access(path, os.X_OK) else "-"
            digest.update(f"\0{path.relative_to(REPO)}\0{mode}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def step(log: Log, what: str, timings: dict[str, float], name: str) -> Iterator[None]:
    """Print a build step, and its duration when done."""
    log(f"==> {what}")
    start = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - start, 1)
    log(f"    {name}: {timings[name]} s")


def _remove(path: Path) -> None:
    """rm -rf for build directories, never through a mount an interrupted mmdebstrap left."""
    if not path.exists():
        return
    inside = [m for m in _mount_points() if m == path or path in m.parents]
    for mount in sorted(inside, key=lambda m: len(m.parts), reverse=True):
        subprocess.run(["umount", "--lazy", str(mount)], check=False)
    if any(m == path or path in m.parents for m in _mount_points()):
        raise BuildError(f"{path} still has mounts in it: unmount them, then remove it")
    shutil.rmtree(path)


def _mount_points() -> list[Path]:
    with open("/proc/self/mounts") as mounts:
        return [Path(line.split()[1].replace("\\040", " ")) for line in mounts]


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, env=env)
    if result.returncode != 0:
        raise BuildError(f"{what} failed (exit {result.returncode}): {shlex.join(argv)}")


def _wheel_python() -> str:
    """The host interpreter whose pip builds the wheels (the repo venv if there is one)."""
    venv = REPO / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    probe = subprocess.run([python, "-c", "import sys, pip; print(*sys.version_info[:2])"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise BuildError(f"{python} has no pip: run `make deps` first (creates .venv)")
    version = tuple(int(v) for v in probe.stdout.split())
    if version != GUEST_PYTHON:
        raise BuildError(f"{python} is Python {version}, the guest has {GUEST_PYTHON}: "
                         "wheels must be built by a Python of the guest's version")
    return python


def build_wheels(dest: Path, work: Path) -> None:
    """The project wheel and all its dependencies' wheels, built by the host's pip."""
    src = work / "src"
    src.mkdir()
    for rel in DEPENDENCIES + CODE:  # a copy: pip writes build/ and egg-info next to it
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, src / rel,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / rel, src / rel)
    _run([_wheel_python(), "-m", "pip", "wheel", "-qq", "--wheel-dir", str(dest), str(src)],
         "pip wheel")


def build(dest: Path, release: bool, sources: str, log: Log) -> dict:
    """Build an image into the empty directory dest; return its manifest."""
    timings: dict[str, float] = {}
    work = dest / "work"
    tree, wheels, recipe = work / "tree", work / "wheels", work / "recipe"
    work.mkdir(parents=True)
    (work / "debian.sources").write_text(sources)
    # a snapshot of the recipe: edits made while the build runs cannot leak into it
    shutil.copytree(APPLIANCE / "rootfs", recipe / "rootfs", symlinks=True)
    shutil.copy2(APPLIANCE / "customize.sh", recipe / "customize.sh")
    include = packages()
    start = time.monotonic()
    with step(log, "wheels of the project and its dependencies (host pip)", timings, "wheels"):
        build_wheels(wheels, work)
    env = dict(os.environ, EVLU_WHEELS=str(wheels), EVLU_OVERLAY=str(recipe / "rootfs"))
    with step(log, f"mmdebstrap {SUITE} minbase + {len(include)} packages", timings,
              "mmdebstrap"):
        _run(["mmdebstrap", "--mode=root", "--variant=minbase", "--quiet",
              f"--include={','.join(include)}",
              *(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES),
              f"--customize-hook={recipe / 'customize.sh'}",
              SUITE, str(tree), str(work / "debian.sources")], "mmdebstrap", env=env)
    with step(log, "kernel and initrd", timings, "kernel"):
        for pattern, name in (("vmlinuz-*", "vmlinuz"), ("initrd.img-*", "initrd.img")):
            found = sorted((tree / "boot").glob(pattern))
            if len(found) != 1:
                raise BuildError(f"expected one /boot/{pattern} in the tree, found {found}")
            shutil.copy2(found[0], dest / name)
        kernel_version = found[0].name.removeprefix("initrd.img-")
    with step(log, f"mkfs.ext4 -d: {DISK_SIZE} raw root disk", timings, "mkfs"):
        with open(dest / "disk.raw", "wb") as disk:
            disk.truncate(0)
        _run(["mkfs.ext4", "-q", "-F", "-L", "evlu-root", "-d", str(tree),
              str(dest / "disk.raw"), DISK_SIZE], "mkfs.ext4")
    deb_packages = subprocess.run(
        ["chroot", str(tree), "dpkg-query", "-W", "-f", "${Package}\n"],
        capture_output=True, text=True, check=True).stdout.split()
    venv = (tree / "opt/evlu-gateway/requirements.lock").read_text().split()
    _remove(work)
    timings["total"] = round(time.monotonic() - start, 1)
    return {"flavour": "release" if release else "dev", "suite": SUITE,
            "kernel": kernel_version, "debian_packages": len(deb_packages),
            "venv": venv, "build_seconds": timings,
            "disk_bytes": (dest / "disk.raw").stat().st_size,
            "disk_used_bytes": (dest / "disk.raw").stat().st_blocks * 512,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _prune(root: Path, keep: Path, log: Log) -> None:
    """Drop interrupted builds and all but the KEEP_IMAGES most recently used images."""
    for partial in root.glob("*.partial"):
        _remove(partial)
    entries = sorted((p for p in root.iterdir() if (p / "manifest.json").exists()),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [e for e in entries if e != keep][KEEP_IMAGES - 1:]:
        log(f"removing old cached image {old}")
        _remove(old)


def ensure_image(release: bool = False, force: bool = False,
                 log: Log = print) -> tuple[Image, bool]:
    """The cached image for the current inputs, built first if needed.

    Returns the image and whether it was built now. One build at a time per
    cache (a lock file); a failed build leaves no cache entry behind.
    """
    sources = bookworm_sources()
    key = cache_key(release, sources)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    image = Image(root / key)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force:
            _remove(image.path)
        if (image.path / "manifest.json").exists():
            os.utime(image.path)
            return image, False
        if os.geteuid() != 0:
            raise BuildError("building the appliance image needs root (mmdebstrap --mode=root)")
        for missing in ("mmdebstrap", "mkfs.ext4"):
            if shutil.which(missing) is None:
                raise BuildError(f"{missing} not found: run `make system-deps` "
                                 "(installs mmdebstrap, e2fsprogs, qemu-system-x86, ...)")
        log(f"building the {'release' if release else 'dev'} appliance image {key} in {root}")
        tmp = root / f"{key}.partial"
        _remove(tmp)
        try:
            manifest = build(tmp, release, sources, log)
            manifest["key"] = key
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            tmp.rename(image.path)
        finally:
            _remove(tmp)
        _prune(root, image.path, log)
        log(f"image ready in {manifest['build_seconds']['total']} s: {image.path}")
        return image, True
