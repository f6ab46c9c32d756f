"""The World English Bible (public domain, modern English) from the Debian package ``sword-text-web``: one document
per book.

Long narrative prose that is not a novel -- genealogies, laws, dialogue, poetry -- and a held-out family for prose
checks beside Austen. The package is a SWORD ``zText`` module: ``ot.bzs`` / ``nt.bzs`` index zlib-compressed blocks
in ``ot.bzz`` / ``nt.bzz`` (12 bytes per block: offset, compressed size, uncompressed size, little-endian uint32).
The blocks, read in order, hold the OSIS markup of the whole text; a book starts at
``<div ... osisID="Gen" sID="..." type="book"/>``. Footnotes are dropped, titles and paragraphs become blank-line
separated lines, every other tag (Strong's ``<w lemma=...>`` word wrappers, chapter and verse milestones) is removed.

Known limit: the module keeps a few stale copies of verses it later rewrote (Romans 14:23 four times, some verses of
Greek Esther, Tobit, Sirach, 4 Maccabees; about 6,000 of 5 million characters). Only its verse index (``.bzv``) knows
which copy is current, and reading through it has traps of its own (16-bit verse sizes overflow in Daniel, Hosea's
book marker sits in a stale copy), so the blocks are read whole. Genesis to Nehemiah have none.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

from qfilters.data.corpus import Document

PACKAGE = "sword-text-web"
#: Bump when parsing changes, so cached parses are redone.
PARSER_VERSION = 2
MODULE_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
TESTAMENTS = ("ot", "nt")

_BOOK_START = re.compile(r"<div\b[^>]*\bsID=\"[^\"]*\"[^>]*>")
_OSIS_ID = re.compile(r"\bosisID=\"([^\"]+)\"")
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_WORD_WRAPPER = re.compile(r"</?w\b[^>]*>")  # Strong's numbers: <w lemma="strong:H0430">God</w>
# a note between a word (or its punctuation) and the next word stood for the space between them
_NOTE_BETWEEN_WORDS = re.compile(r"(?<=[\w,;:.!?\u201d\u2019])<note\b.*?</note>(?=[\w\u201c\u2018])", re.S)
_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_BREAK = re.compile(r"<div\b[^>]*type=\"x-p\"[^>]*/>|<lb\b[^>]*/>|<l\b[^>]*/>")
_TAG = re.compile(r"<[^>]+>")


def parse_bible(root: Path) -> list[Document]:
    """The books of the extracted package at ``root``, in the module's order (the deuterocanon among them, e.g.
    Greek Esther after Esther), titled by OSIS id (``Gen``, ``Matt``)."""
    module = root / MODULE_DIR
    if not module.is_dir():
        raise FileNotFoundError(f"{module} is missing: is this the {PACKAGE} package?")
    return split_books("".join(read_ztext(module / f"{t}.bzs", module / f"{t}.bzz") for t in TESTAMENTS))


def read_ztext(index: Path, blocks: Path) -> str:
    """The decompressed blocks of one zText testament, in order (empty blocks skipped)."""
    table, data = index.read_bytes(), blocks.read_bytes()
    if len(table) % 12:
        raise ValueError(f"{index}: {len(table)} bytes is not a whole number of 12-byte block entries")
    out: list[bytes] = []
    for offset, size, expected in struct.iter_unpack("<III", table):
        if not size:
            continue
        block = zlib.decompress(data[offset : offset + size])
        if len(block) != expected:
            raise ValueError(f"{blocks}: a block at offset {offset} holds {len(block)} bytes, its index says "
                             f"{expected}")
        out.append(block)
    return b"".join(out).decode("utf-8")  # joined first: a block boundary may split a character


def split_books(osis: str) -> list[Document]:
    """One plain-text document per ``type="book"`` division of an OSIS text."""
    starts = [m for m in _BOOK_START.finditer(osis) if 'type="book"' in m.group(0)]
    documents = []
    for k, start in enumerate(starts):
        end = starts[k + 1].start() if k + 1 < len(starts) else len(osis)
        osis_id = _OSIS_ID.search(start.group(0))
        text = plain_text(osis[start.end() : end])
        if osis_id and text.strip():
            documents.append(Document(osis_id.group(1), text))
    return documents


def plain_text(osis: str) -> str:
    """OSIS markup to text: notes dropped, titles and paragraphs on their own lines, other tags removed."""
    text = _NOTE.sub("", _NOTE_BETWEEN_WORDS.sub(" ", _WORD_WRAPPER.sub("", osis)))
    text = _TITLE.sub(r"\n\n\1\n\n", text)
    text = _TAG.sub("", _BREAK.sub("\n", text))
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
