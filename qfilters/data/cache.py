"""Where corpora are cached, and the parsed-document cache (written atomically: a crash never leaves half a file).

Layout under ``<root>/corpora/`` (root: :func:`qfilters.paths.cache_root`: the ``cache_dir`` argument, else
``$QFILTERS_CACHE``, else ``~/.cache/qfilters``):

* ``debian/<package>_<version>/`` -- a ``dpkg -x`` extraction of one Debian package (see :mod:`.debian`);
* ``parsed/<key>.json`` -- documents already parsed from such extractions, keyed by package versions and parser
  version, so a warm load reads one JSON file instead of re-parsing hundreds of HTML pages.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from qfilters.data.corpus import Document
from qfilters.fileio import atomic_write_text
from qfilters.paths import cache_root

_CACHE_FORMAT = 1  # bump when the parsed-cache JSON layout changes


def corpora_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ``corpora`` subdirectory of the cache root (not created here)."""
    return cache_root(cache_dir) / "corpora"


def safe_name(text: str) -> str:
    """A file-name-safe rendering of ``text`` (Debian versions contain ``:`` and ``+``; keep them readable)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", lambda m: f"%{ord(m.group()):02x}", text)


def load_parsed(path: Path, key: str) -> list[Document] | None:
    """Documents from a parsed-cache file, or ``None`` when it is missing, stale or unreadable (then re-parse)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != _CACHE_FORMAT or payload.get("key") != key:
            return None
        return [Document(title, text) for title, text in payload["documents"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_parsed(path: Path, key: str, documents: list[Document]) -> None:
    """Store parsed documents atomically; a cache that cannot be written only costs speed, so errors are ignored."""
    payload = {"format": _CACHE_FORMAT, "key": key, "documents": [[d.title, d.text] for d in documents]}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload, ensure_ascii=False), durable=False)
