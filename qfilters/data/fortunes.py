"""Fortune-cookie corpora from the Debian ``fortunes*`` packages: one document per fortune file.

A fortune file is plain text whose entries are separated by lines holding only ``%``. Skipped: the ``.dat`` random
access indexes, the offensive ``off/`` collections (only the top level of each language directory is read), and
duplicate ``.u8`` names -- ``NAME.u8`` is the UTF-8 variant of ``NAME``; when both exist the ``.u8`` one is read,
under the title ``NAME``. Files that are not valid UTF-8 are decoded with the language's legacy encoding.
"""

from __future__ import annotations

from pathlib import Path

from qfilters.data.corpus import Document
from qfilters.data.debian import DebianPackage

#: Bump when parsing changes, so cached parses are redone.
PARSER_VERSION = 1

# Where each language's files live inside its package(s).
FORTUNE_DIRS = {
    "en": "usr/share/games/fortunes",
    "de": "usr/share/games/fortunes/de",
    "es": "usr/share/games/fortunes/es",
    "it": "usr/share/games/fortunes/it",
    "ru": "usr/share/games/fortunes/ru",
}
_LEGACY_ENCODING = {"ru": "koi8-r"}


def split_fortunes(text: str) -> list[str]:
    """The individual fortunes of one file (separator: a line that is exactly ``%``), stripped, empties dropped."""
    fortunes: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.rstrip() == "%":
            fortunes.append("\n".join(current).strip("\n").rstrip())
            current = []
        else:
            current.append(line.rstrip())
    fortunes.append("\n".join(current).strip("\n").rstrip())
    return [fortune for fortune in fortunes if fortune.strip()]


def fortune_files(directory: Path) -> dict[str, Path]:
    """``title -> file`` for the fortune files directly in ``directory`` (``.u8`` variants preferred)."""
    files: dict[str, Path] = {}
    if not directory.is_dir():
        return files
    resolved_dir = directory.resolve()
    for path in sorted(directory.iterdir()):
        if path.suffix == ".dat" or not path.is_file() or path.resolve().parent != resolved_dir:
            continue  # index files, subdirectories (off/), links into other languages' directories
        title = path.name[: -len(".u8")] if path.name.endswith(".u8") else path.name
        if title not in files or path.name.endswith(".u8"):
            files[title] = path
    return files


def parse_fortunes(packages: list[DebianPackage], lang: str) -> list[Document]:
    """One document per fortune file across ``packages``, sorted by title; fortunes joined by blank lines."""
    found: dict[str, Path] = {}
    for package in packages:
        for title, path in fortune_files(package.root / FORTUNE_DIRS[lang]).items():
            found.setdefault(title, path)
    documents = []
    for title in sorted(found):
        data = found[title].read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode(_LEGACY_ENCODING.get(lang, "latin-1"), errors="replace")
        fortunes = split_fortunes(text)
        if fortunes:
            documents.append(Document(title, "\n\n".join(fortunes)))
    return documents
