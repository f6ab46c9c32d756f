"""Remember which cached files were already hashed, so a warm load re-hashes only files that changed since.

The loader checks every downloaded file against the hash its server or registry declared. For the weights (the only
file large enough for hashing to matter), the digest is recorded next to the file's ``stat`` fingerprint (size,
mtime, ctime, inode) under ``$QFILTERS_CACHE/client/verified/``; a later load with the same fingerprint reuses it,
as git's index does. Writing to the file changes its fingerprint (ctime cannot be set back by a user), so a file
changed after download is hashed again and refused. As in git ("racy clean" entries), a file modified less than
``RACY_S`` ago is not recorded: file times are coarse, and a write in the same tick would leave them unchanged.
Records are hints: unreadable or stale ones are ignored.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from qfilters.fileio import atomic_write_text
from qfilters.paths import cache_root

RACY_S = 2.0


def client_dir() -> Path:
    """``$QFILTERS_CACHE/client`` (default ``~/.cache/qfilters/client``): resolution records, registry blobs, stamps."""
    return cache_root() / "client"


def _fingerprint(path: Path) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino} {st.st_dev}"


def _settled(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_S * 1e9


def _record(path: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:32]
    return client_dir() / "verified" / key


def known_digest(path: Path) -> str | None:
    """The sha256 recorded for ``path`` if the file is unchanged since it was hashed, else ``None``."""
    fingerprint = _fingerprint(path)
    if fingerprint is None:
        return None
    try:
        recorded, digest = _record(path).read_text(encoding="ascii").rsplit(" ", 1)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return digest if recorded == fingerprint and len(digest) == 64 else None


def remember_digest(path: Path, digest: str) -> None:
    """Record that ``path``, as it is now, has sha256 ``digest`` (best effort: a read-only cache just re-hashes)."""
    fingerprint = _fingerprint(path)
    if fingerprint is None or not _settled(path):
        return
    record = _record(path)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, f"{fingerprint} {digest}", encoding="ascii", durable=False)  # a hint: no fsync
    except OSError:
        pass
