"""Fetch a Debian package's files into the qfilters cache without installing anything system-wide.

Every package-backed corpus (handbook, austen, bible, jargon, python-docs, fortunes) goes through
:func:`fetch_package`: ``apt-get download`` into a temporary directory, ``dpkg-deb -x`` next to it, then one atomic
rename to ``<cache>/corpora/debian/<package>_<version>/``. A directory at that path is therefore always complete, and
a warm load reuses the newest cached extraction without running apt at all (so it is fast, works offline, and a corpus
stays byte-identical on a machine); delete the cached directory, or call ``fetch_package(..., refresh=True)``, to
pick up a newer Debian version.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qfilters.data.cache import corpora_dir, safe_name
from qfilters.errors import DatasetUnavailableError

# Commands, overridable (tests point them at missing binaries to exercise the failure path).
APT_GET = "apt-get"
APT_CACHE = "apt-cache"
DPKG_DEB = "dpkg-deb"

_MARKER = ".qfilters-package.json"
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_HINT = (
    "Run `apt-get update` (as root) so apt knows the package, check that this is a Debian/Ubuntu system with "
    "network access to its package mirror, then retry. Alternatively use a local corpus (a path or glob) or an "
    "hf: spec."
)


@dataclass(frozen=True)
class DebianPackage:
    """An extracted Debian package: its name, exact version and the root of its unpacked file tree."""

    name: str
    version: str
    root: Path

    @property
    def label(self) -> str:
        """``"name version"``, the form recorded in ``Corpus.source``."""
        return f"{self.name} {self.version}"


def fetch_package(
    name: str, cache_dir: str | os.PathLike[str] | None = None, refresh: bool = False
) -> DebianPackage:
    """Return the extracted tree of Debian package ``name``, downloading it on first use.

    A cached extraction is reused without asking apt (fast, and the corpus stays byte-identical on this machine);
    ``refresh=True`` asks apt for its current candidate version and fetches it if it is not cached yet. Raises
    :class:`DatasetUnavailableError` (with apt's own message and what to do) when the package can be neither found
    in the cache nor downloaded.
    """
    if not _PACKAGE_NAME.fullmatch(name):
        raise ValueError(f"invalid Debian package name {name!r}")
    base = corpora_dir(cache_dir) / "debian"
    cached = _newest_cached(base, name)
    if cached is not None and not refresh:
        return cached
    try:
        version = candidate_version(name)
    except DatasetUnavailableError:
        if cached is not None:
            return cached
        raise
    target = base / f"{name}_{safe_name(version)}"
    if (target / _MARKER).is_file():
        return DebianPackage(name, version, target)
    return _download_and_extract(name, base)


def candidate_version(name: str) -> str:
    """The version ``apt-get download`` would fetch (``apt-cache policy``'s Candidate)."""
    proc = _run([APT_CACHE, "policy", name])
    match = re.search(r"^\s*Candidate:\s*(\S+)\s*$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not match or match.group(1) == "(none)":
        output = proc.stderr.strip() or proc.stdout.strip()
        detail = output.splitlines()[-1] if output else "apt-cache knows no such package"
        raise DatasetUnavailableError(
            f"apt has no installable candidate for Debian package {name!r} ({detail}). {_HINT}"
        )
    return match.group(1)


def _download_and_extract(name: str, base: Path) -> DebianPackage:
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=f".fetch-{name}-") as tmp:
        proc = _run([APT_GET, "download", name], cwd=tmp, timeout=900)
        debs = sorted(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            apt_text = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}")[-2000:]
            raise DatasetUnavailableError(f"`apt-get download {name}` failed:\n{apt_text}\n{_HINT}")
        deb = debs[0]
        fields = _run([DPKG_DEB, "-f", str(deb), "Version"])
        version = fields.stdout.strip()
        if fields.returncode != 0 or not version:
            raise DatasetUnavailableError(f"cannot read the version of {deb.name}: {fields.stderr.strip()}")
        tree = Path(tmp) / "tree"
        extracted = _run([DPKG_DEB, "-x", str(deb), str(tree)], timeout=900)
        if extracted.returncode != 0:
            raise DatasetUnavailableError(f"`dpkg-deb -x {deb.name}` failed: {extracted.stderr.strip()}")
        (tree / _MARKER).write_text(json.dumps({"package": name, "version": version}), encoding="utf-8")
        target = base / f"{name}_{safe_name(version)}"
        try:
            os.rename(tree, target)  # atomic: the target either does not exist or is complete
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent fetch that won the race
                raise
    return DebianPackage(name, version, target)


def _newest_cached(base: Path, name: str) -> DebianPackage | None:
    """The most recently extracted cached version of ``name``, if any (used when apt cannot be asked)."""
    found: list[tuple[float, DebianPackage]] = []
    for marker in base.glob(f"{_glob_escape(name)}_*/{_MARKER}"):
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if info.get("package") == name:
            found.append((marker.stat().st_mtime, DebianPackage(name, str(info["version"]), marker.parent)))
    return max(found, key=lambda item: item[0])[1] if found else None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _run(cmd: list[str], cwd: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise DatasetUnavailableError(
            f"`{cmd[0]}` was not found on PATH: Debian-packaged corpora need apt-get, apt-cache and dpkg-deb "
            "(Debian/Ubuntu). On such a system, check PATH and run `apt-get update`; elsewhere use a local corpus "
            "(a path or glob) or an hf: spec."
        ) from None
    except subprocess.TimeoutExpired:
        raise DatasetUnavailableError(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s. {_HINT}") from None
