"""Where qfilters keeps what it caches: one root for corpora, converted models and the client's records.

Import-cheap on purpose (the client reads it on every ``from_pretrained``): no package ``__init__`` with loaders.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_DIR_OVERRIDE", "cache_root"]

#: Set to a path to override ``$QFILTERS_CACHE`` for this process (tests, embedding applications).
CACHE_DIR_OVERRIDE: str | os.PathLike[str] | None = None


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The qfilters cache root: explicit argument, module override, ``$QFILTERS_CACHE``, then ``~/.cache/qfilters``."""
    chosen = cache_dir or CACHE_DIR_OVERRIDE or os.environ.get("QFILTERS_CACHE")
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "qfilters"
