"""The Jargon File (hacker lexicon, public domain) from the Debian package ``jargon-text``: one document per letter.

A lexicon is a text family of its own -- short definitions full of cross-references (``{bit bucket}``), quotes and
pronunciations -- neither the handbook's technical prose nor a novel, which makes it a useful held-out text. The
package ships ``jargon.txt.gz`` (the File rendered as text). Only the glossary is read: entries are lines that start
``   :TERM:`` (three spaces, the term between colons) up to the next entry; the per-letter tables of contents
between entries (a letter heading indented two spaces, then the bare terms) are dropped. Entries whose term starts
with a letter go to that letter's document (``A`` ... ``Z``), the others (``/dev/null``, ``404``) to ``0-9``.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from qfilters.data.corpus import Document

PACKAGE = "jargon-text"
#: Bump when parsing changes, so cached parses are redone.
PARSER_VERSION = 1
TEXT_FILE = "usr/share/doc/jargon-text/jargon.txt.gz"

_ENTRY = re.compile(r"^   :([^:]+):")
_LETTER_HEADING = re.compile(r"^  [A-Z]$")
_GLOSSARY_END = re.compile(r"^\s*Part\s+III\.")  # the appendices (NBSPs normalized first)
SYMBOLS = "0-9"


def parse_jargon(root: Path) -> list[Document]:
    """The glossary of the extracted package at ``root``, one document per initial (``0-9`` first, then A-Z)."""
    path = root / TEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is this the {PACKAGE} package?")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return split_glossary(f.read())


def split_glossary(text: str) -> list[Document]:
    """The glossary entries of a Jargon File text rendering, grouped by initial."""
    groups: dict[str, list[list[str]]] = {}
    entry: list[str] | None = None  # the entry being read; None inside a table of contents or outside the glossary
    for raw in text.replace("\u00a0", " ").splitlines():
        if groups and _GLOSSARY_END.match(raw):
            break
        match = _ENTRY.match(raw)
        if match:
            initial = match.group(1)[0].upper()
            entry = []
            groups.setdefault(initial if "A" <= initial <= "Z" else SYMBOLS, []).append(entry)
        elif _LETTER_HEADING.match(raw):
            entry = None
        if entry is not None:
            entry.append(raw.strip())
    documents = []
    for title in sorted(groups, key=lambda t: (t != SYMBOLS, t)):
        entries = ["\n".join(lines).strip() for lines in groups[title]]
        body = re.sub(r"\n{3,}", "\n\n", "\n\n".join(e for e in entries if e))
        if body.strip():
            documents.append(Document(title, body + "\n"))
    return documents
