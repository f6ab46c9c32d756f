"""Local text corpora: single files, directories (recursive) and globs.

``.jsonl`` files give one document per non-blank line (text from ``LocalSpec.field``); every other file gives one
document. Directories contribute only ``.txt``, ``.md`` and ``.jsonl`` files; an explicitly named file or glob match
is read whatever its extension. Files are read as strict UTF-8 so binary files fail loudly instead of polluting a
calibration set with mojibake.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from qfilters.data.corpus import Document
from qfilters.data.spec import LocalSpec
from qfilters.errors import DatasetSpecError, DatasetUnavailableError

DIRECTORY_SUFFIXES = (".txt", ".md", ".jsonl")


def load_local(spec: LocalSpec) -> tuple[list[Document], str]:
    """Documents and a source description for a local spec, in sorted path order."""
    files = _resolve_files(spec.path)
    if spec.field != "text" and not any(path.suffix == ".jsonl" for _, path in files):
        raise DatasetSpecError(f"dataset spec {spec.normalized!r}: '#{spec.field}' selects a JSONL field, but no "
                               ".jsonl file matches; drop the #FIELD suffix for plain text files.")
    documents: list[Document] = []
    for title, path in files:
        if path.suffix == ".jsonl":
            documents.extend(_read_jsonl(path, title, spec.field))
        else:
            text = _read_text(path)
            if text.strip():
                documents.append(Document(title, text))
    noun = "file" if len(files) == 1 else "files"
    return documents, f"local {noun}: {spec.path} ({len(files)} {noun})"


def _resolve_files(path_spec: str) -> list[tuple[str, Path]]:
    """``(title, path)`` pairs sorted by title; titles are paths relative to a directory spec, else as matched."""
    expanded = os.path.expanduser(path_spec)
    root = Path(expanded)
    if root.is_dir():
        found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DIRECTORY_SUFFIXES]
        pairs = [(p.relative_to(root).as_posix(), p) for p in found]
    elif root.is_file():
        pairs = [(root.name, root)]
    else:
        pairs = [(Path(m).as_posix(), Path(m)) for m in glob.glob(expanded, recursive=True) if Path(m).is_file()]
    return sorted(pairs, key=lambda pair: pair[0])


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetUnavailableError(f"{path}: not UTF-8 text (byte offset {err.start}); convert it to UTF-8 or "
                                      "narrow the spec to text files only.") from None
    except OSError as err:
        raise DatasetUnavailableError(f"{path}: cannot read ({err.strerror}).") from None


def _read_jsonl(path: Path, title: str, field: str) -> list[Document]:
    documents = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetUnavailableError(f"{path}, line {lineno}: invalid JSON ({err.msg} at column {err.colno}); "
                                          "each line of a .jsonl file must be one JSON object.") from None
        if not isinstance(record, dict):
            raise DatasetUnavailableError(f"{path}, line {lineno}: expected a JSON object, got a JSON "
                                          f"{type(record).__name__}.")
        if field not in record:
            example = next(iter(sorted(record)), "text")
            raise DatasetSpecError(f"{path}, line {lineno}: no field {field!r} (fields: {', '.join(sorted(record))});"
                                   f" choose the text field with PATH#FIELD, e.g. '{path}#{example}'.")
        value = record[field]
        if not isinstance(value, str):
            raise DatasetUnavailableError(f"{path}, line {lineno}: field {field!r} is a JSON "
                                          f"{type(value).__name__}, expected a string.")
        if value.strip():
            documents.append(Document(f"{title}:{lineno}", value))
    return documents
