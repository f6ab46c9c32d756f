"""Calibration and evaluation corpora, named by spec strings.

>>> corpus = load_corpus("handbook:en")          # doctest: +SKIP
>>> corpus.spec, len(corpus), corpus.sha256[:12]  # doctest: +SKIP

Spec kinds (``available_specs()`` lists them with descriptions):

* ``handbook[:LANG]``, ``austen``, ``bible``, ``jargon``, ``python-docs``, ``fortunes[:LANG]`` -- text shipped in
  Debian packages, fetched with ``apt-get download`` + ``dpkg-deb -x`` into the cache (nothing is installed
  system-wide);
* ``python-code`` -- this interpreter's standard library sources;
* ``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` -- a Hugging Face dataset split (optional ``datasets`` dependency);
* a path, directory or glob of ``.txt``/``.md``/``.jsonl`` files; ``PATH.jsonl#FIELD`` picks the JSONL text field,
  ``file:PATH`` forces a path when it would look like another kind.

Importing this package is cheap: no torch, transformers or datasets until a loader or tokenizer needs them.
"""

from __future__ import annotations

from qfilters.data.corpus import Corpus, Document
from qfilters.data.loader import load_corpus
from qfilters.data.spec import (
    FortunesSpec,
    HandbookSpec,
    HFSpec,
    LocalSpec,
    NamedSpec,
    Spec,
    available_specs,
    parse_spec,
)
from qfilters.data.tokens import iter_token_chunks

__all__ = [
    "Corpus",
    "Document",
    "FortunesSpec",
    "HFSpec",
    "HandbookSpec",
    "LocalSpec",
    "NamedSpec",
    "Spec",
    "available_specs",
    "iter_token_chunks",
    "load_corpus",
    "parse_spec",
]
