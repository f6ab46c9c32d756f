"""Python corpora: the reST documentation sources (``python-docs``) and the running interpreter's standard library
(``python-code``). Both give one document per file, sorted by relative path, titled with that path."""

from __future__ import annotations

import platform
import re
import sysconfig
import tokenize
from pathlib import Path

from qfilters.data.corpus import Document

DOCS_PACKAGE = "python3.11-doc"
DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
#: Bump when parsing changes, so cached parses are redone.
PARSER_VERSION = 1

# Directory names whose contents are tests or third-party code, not the standard library proper.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_TEST_FILE = re.compile(r"^test_.*\.py$")


def parse_python_docs(package_root: Path) -> list[Document]:
    """Every ``*.rst.txt`` source under the package's ``_sources`` directory (title: path without ``.txt``)."""
    root = package_root / DOCS_SOURCES
    documents = []
    for path in sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix()):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            documents.append(Document(path.relative_to(root).as_posix()[: -len(".txt")], text))
    return documents


def stdlib_dir() -> Path:
    """The interpreter's pure-Python standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_description() -> str:
    """What ``python-code`` reads, for ``Corpus.source``: the interpreter and its version (the text depends on it),
    no install path (sources end up in reports and public listings, where a path tells how the host is laid out)."""
    return f"{platform.python_implementation()} {platform.python_version()} standard library"


def is_stdlib_source(relative: Path) -> bool:
    """True for ``.py`` files that are part of the library proper: not tests, not installed third-party packages."""
    return (
        relative.suffix == ".py"
        and not _TEST_FILE.match(relative.name)
        and not any(part in _EXCLUDED_DIRS for part in relative.parts[:-1])
    )


def parse_python_code(root: Path | None = None) -> list[Document]:
    """The standard library's ``.py`` files (tests and site-packages excluded), decoded per PEP 263."""
    root = root or stdlib_dir()
    paths = [p for p in root.rglob("*.py") if p.is_file() and is_stdlib_source(p.relative_to(root))]
    documents = []
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        try:
            with tokenize.open(path) as handle:  # honours "# -*- coding: ... -*-" declarations
                text = handle.read()
        except (SyntaxError, UnicodeDecodeError):
            text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            documents.append(Document(path.relative_to(root).as_posix(), text))
    return documents
