"""The Jargon File (hacker lexicon, public domain) from the Debian package ``jargon-text``: one document per letter.

A lexicon is a text family of its own -- short definitions full of cross-references (``{bit bucket}``), quotes and
pronunciations -- neither the handbook's technical prose nor a novel, which makes it a useful held-out text. The
package ships ``jargon.txt.gz`` (the File rendered as text). Only the glossary is read: entries are lines that start
``   :TERM:`` (three spaces, the term between colons) up to the next entry; the per-letter tables of contents
between entries (a section heading indented two spaces, then the bare terms) are dropped. Each entry goes to its
section's document, as the File files it: ``0-9`` (``/dev/null``, ``404``), then ``A`` ... ``Z`` (suffixes such as
``-oid`` sit under their letter).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from qfilters.data.corpus import Document

PACKAGE = "jargon-text"
#: Bump when parsing changes, so cached parses are redone.
PARSER_VERSION = 2
TEXT_FILE = "usr/share/doc/jargon-text/jargon.txt.gz"

_ENTRY = re.compile(r"^   :([^:]+):")
_SECTION_HEADING = re.compile(r"^  ([0-9A-Z])$")
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
    """The glossary entries of a Jargon File text rendering, grouped by section."""
    groups: dict[str, list[list[str]]] = {}
    section = SYMBOLS  # the glossary opens with the symbols and digits
    entry: list[str] | None = None  # the entry being read; None inside a table of contents or outside the glossary
    for raw in text.replace("\u00a0", " ").splitlines():
        if groups and _GLOSSARY_END.match(raw):
            break
        heading = _SECTION_HEADING.match(raw)
        if heading:
            section, entry = (heading.group(1) if heading.group(1).isalpha() else SYMBOLS), None
        elif _ENTRY.match(raw):
            entry = []
            groups.setdefault(section, []).append(entry)
        if entry is not None:
            entry.append(raw.strip())
    documents = []
    for title in sorted(groups, key=lambda t: (t != SYMBOLS, t)):
        entries = ["\n".join(lines).strip() for lines in groups[title]]
        body = re.sub(r"\n{3,}", "\n\n", "\n\n".join(e for e in entries if e))
        if body.strip():
            documents.append(Document(title, body + "\n"))
    return documents
