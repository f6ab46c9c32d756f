"""The one atomic-write helper: old file or new file, never half of one; no litter; explicit permissions."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qfilters import fileio
from qfilters.fileio import atomic_directory, atomic_path, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_and_replaces_bytes_and_text(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    assert atomic_write_bytes(target, b"one") == target
    assert target.read_bytes() == b"one"
    atomic_write_text(target, "tw\u00f6\nlines\n")
    assert target.read_bytes() == "tw\u00f6\nlines\n".encode()  # utf-8, \n kept as is on every platform
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_text("half of the ne")  # a writer dies half-way
        raise error
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.bin"):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_default_mode_is_ordinary_minus_umask(tmp_path: Path, umask_022: None) -> None:
    assert _mode(atomic_write_bytes(tmp_path / "a", b"x")) == 0o644
    os.umask(0o077)
    assert _mode(atomic_write_bytes(tmp_path / "b", b"x")) == 0o600  # the umask is honoured, as open() does


def test_explicit_mode_for_private_files(tmp_path: Path, umask_022: None) -> None:
    assert _mode(atomic_write_bytes(tmp_path / "secret", b"x", mode=0o600)) == 0o600
    public = tmp_path / "public"
    public.write_bytes(b"old")
    os.chmod(public, 0o600)
    assert _mode(atomic_write_bytes(public, b"new")) == 0o644  # the new file's mode, not the old one's


def test_a_writer_that_replaces_the_temp_file_still_gets_the_mode(tmp_path: Path, umask_022: None) -> None:
    """safetensors.save_file writes its own private file and renames it over the path it was given."""
    target = tmp_path / "model.safetensors"
    with atomic_path(target) as tmp:
        own = tmp.with_name("writer-own-temp")
        fd = os.open(own, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"weights")
        os.close(fd)
        os.replace(own, tmp)
    assert target.read_bytes() == b"weights" and _mode(target) == 0o644


def test_not_durable_skips_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: calls.append(fd))
    atomic_write_bytes(tmp_path / "hint", b"x", durable=False)
    assert calls == []
    atomic_write_bytes(tmp_path / "kept", b"x")
    assert len(calls) == 2  # the file, then its folder (the rename)


def test_atomic_directory_replaces_a_folder_as_a_whole(tmp_path: Path) -> None:
    target = tmp_path / "art"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in target.iterdir()] == ["a"]
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("crash mid-save")
    assert [p.name for p in target.iterdir()] == ["a"]  # the old folder, untouched
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary or old folder left behind


def test_atomic_directory_honours_the_umask(tmp_path: Path, umask_022: None) -> None:
    with atomic_directory(tmp_path / "art"):
        pass
    assert _mode(tmp_path / "art") == 0o755
