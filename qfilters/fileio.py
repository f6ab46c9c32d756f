"""Atomic file writes: a reader sees the old file or the new one, never half of one, and a failure leaves no litter.

Every writer in qfilters (artifacts, reports, caches) and in the registry's blob store goes through here, so the
recipe lives once: write a temporary file in the target's folder (same filesystem, so the rename is atomic), give it
its final permissions, flush it to disk, ``os.replace`` it over the target, then flush the folder so the rename
itself survives a crash. Any failure, including an interrupt, removes the temporary file and leaves the target as it
was.

Permissions are explicit: ``mode`` (default ``0o644``, what users expect of files they can share) minus the process
umask, exactly as ``open()`` would apply it. The registry passes ``0o600`` for its private blobs. Writers that create
the file themselves (``safetensors.torch.save_file`` writes a private temporary file and renames it) get the mode
reapplied afterwards, so an artifact's files all end up with the same permissions.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DEFAULT_MODE", "atomic_directory", "atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]

DEFAULT_MODE = 0o644


def _temp_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex}"


@contextmanager
def atomic_path(target: str | os.PathLike[str], *, mode: int = DEFAULT_MODE, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on a clean exit it replaces ``target`` atomically.

    Write the content to the yielded path (any writer: ``save_file(tensors, str(tmp))``, ``tmp.write_bytes``). The
    temporary file is created empty with ``mode`` minus the umask (the kernel applies it, so no umask is read), and
    that mode is set again after the writer ran. ``durable=False`` skips the fsyncs, for caches that are only hints.
    The folder must exist.
    """
    target = Path(target)
    tmp = _temp_sibling(target, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the name is ours alone; umask applied here
    try:
        final_mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, final_mode)  # a writer that replaced the file left its own mode
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, *, mode: int = DEFAULT_MODE,
                       durable: bool = True) -> Path:
    """Replace ``target`` with ``data`` atomically (see :func:`atomic_path`); returns the target path."""
    with atomic_path(target, mode=mode, durable=durable) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str, *, mode: int = DEFAULT_MODE, durable: bool = True,
                      encoding: str = "utf-8") -> Path:
    """Replace ``target`` with ``text`` atomically, ``\\n`` line ends on every platform (deterministic bytes)."""
    return atomic_write_bytes(target, text.encode(encoding), mode=mode, durable=durable)


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty folder next to ``target``; on a clean exit it replaces ``target`` (a folder) as a whole.

    The folder is made with the umask's permissions (unlike ``tempfile.mkdtemp``'s 0700). Swapping two folders takes
    two renames: the old folder is moved aside first and moved back if the second rename fails, so ``target`` is
    always either the old folder or the new one. Files written inside should themselves be flushed
    (:func:`atomic_path` does).
    """
    target = Path(target)
    tmp = _temp_sibling(target, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        fsync_dir(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _temp_sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
