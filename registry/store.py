"""Content-addressed artifact store: files live under ``root/ab/abcdef...`` by their sha256, written atomically.

A local directory by default; SQL rows (:class:`registry.models.Blob`) reference the files by hash, so the same
bytes are stored once however many filter sets or reports share them. Workers on many hosts share one store through
an fsspec URL (``s3://bucket/qfilters``, ``gcs://...``, ``memory://`` in tests): fsspec does the talking, not us.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from qfilters.fileio import atomic_write_bytes

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def open_store(location: str | os.PathLike[str]) -> ArtifactStore:
    """A local directory, or an fsspec URL (any ``proto://`` other than ``file://``) for a store shared by hosts."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return RemoteArtifactStore(text)
    return ArtifactStore(text.removeprefix("file://"))


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        """Store ``data``; returns ``(sha256, size)``. Storing the same bytes twice is a no-op."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path_for(sha)
        if not target.exists():
            self._write_atomic(target, data)
        return sha, len(data)

    def read_bytes(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()

    def _write_atomic(self, target: Path, data: bytes) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # owner only, like the database next to it
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data, mode=0o600)  # private, like the root folder


class RemoteArtifactStore(ArtifactStore):
    """The same content-addressed layout in an object store, through fsspec (a whole-object PUT is atomic there)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url)
        self.root = Path(self.base)  # only for the layout: there is no local file behind it

    def _key(self, sha256: str) -> str:
        self.path_for(sha256)  # validates the digest
        return f"{self.base.rstrip('/')}/{sha256[:2]}/{sha256}"

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(data).hexdigest()
        key = self._key(sha)
        if not self.fs.exists(key):
            self.fs.pipe_file(key, data)
        return sha, len(data)

    def read_bytes(self, sha256: str) -> bytes:
        return self.fs.cat_file(self._key(sha256))
