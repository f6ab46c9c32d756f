"""Prose from the Debian Administrator's Handbook (Debian package ``debian-handbook``), one document per HTML page.

The package ships the book as Publican XHTML in ``usr/share/doc/debian-handbook/html/<locale>/``. Calibration
wants natural-language text, so only prose blocks are kept: ``<div class="para">`` and ``<p>`` elements (list items
and sidebars consist of these too). Dropped: code and terminal listings (``<pre>``, ``programlisting``, ``screen``),
examples and figures, titles, navigation bars, tables of contents, the legal notice, and ``index.html`` (title
page, legal notice and table of contents only). Pages are sorted by file name; a page without prose is skipped.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path

from qfilters.data.corpus import Document
from qfilters.errors import DatasetSpecError

PACKAGE = "debian-handbook"
HTML_ROOT = "usr/share/doc/debian-handbook/html"
#: Bump when extraction changes, so cached parses are redone.
PARSER_VERSION = 1

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "wbr"}
# Whole subtrees that never contain prose we want.
_SKIP_TAGS = {"pre", "script", "style", "head", "table"}
_SKIP_CLASSES = {
    "programlisting", "screen", "computeroutput", "synopsis", "example", "informalexample", "figure",
    "mediaobject", "toc", "docnav", "legalnotice", "index", "indexterm", "titlepage", "title", "copyright",
    "calloutlist", "table", "informaltable", "author", "authorgroup", "revhistory",
}  # fmt: skip
_SKIP_IDS = {"banner", "title", "site_footer", "footer"}
_SKIP_PAGES = {"index.html"}
_SPACES = re.compile(r"\s+")


class _ProseExtractor(HTMLParser):
    """Collects the text of prose blocks, outside any skipped subtree, in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, starts a skipped subtree, starts a prose block)
        self.skip_depth = 0
        self.prose_buffers: list[list[str]] = []
        self.paragraphs: list[str] = []
        self.title_parts: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        if tag in _VOID:
            if tag == "br" and self.skip_depth == 0 and self.prose_buffers:
                self.prose_buffers[-1].append(" ")
            return
        values = dict(attrs)
        classes = set((values.get("class") or "").split())
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES) or values.get("id") in _SKIP_IDS
        prose = not skip and (tag == "p" or (tag == "div" and "para" in classes))
        if prose and self.skip_depth == 0:
            self._flush()  # a block nested in another block: emit what the outer one had so far
            self.prose_buffers.append([])
        self.stack.append((tag, skip, prose and self.skip_depth == 0))
        if skip:
            self.skip_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)  # XHTML "<a id='x'/>": an element that opens and closes at once
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in _VOID or not any(open_tag == tag for open_tag, _, _ in self.stack):
            return  # stray end tag: ignore rather than unbalance the stack
        while self.stack:
            open_tag, skip, prose = self.stack.pop()
            if skip:
                self.skip_depth -= 1
            if prose:
                self._flush()
                self.prose_buffers.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_parts.append(data)
        elif self.skip_depth == 0 and self.prose_buffers:
            self.prose_buffers[-1].append(data)

    def _flush(self) -> None:
        if self.prose_buffers:
            text = _SPACES.sub(" ", "".join(self.prose_buffers[-1])).strip()
            if text:
                self.paragraphs.append(text)
            self.prose_buffers[-1].clear()

    @property
    def title(self) -> str:
        return _SPACES.sub(" ", html.unescape("".join(self.title_parts))).strip()


def extract_page(markup: str) -> tuple[str, list[str]]:
    """``(page title, prose paragraphs)`` of one handbook XHTML page."""
    parser = _ProseExtractor()
    parser.feed(markup)
    parser.close()
    return parser.title, parser.paragraphs


def handbook_locales(package_root: Path) -> list[str]:
    """Locales present in an extracted debian-handbook package."""
    root = package_root / HTML_ROOT
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def parse_handbook(package_root: Path, locale: str) -> list[Document]:
    """One document per page of ``locale`` with prose, sorted by file name; title = the page's HTML title."""
    page_dir = package_root / HTML_ROOT / locale
    if not page_dir.is_dir():
        available = ", ".join(handbook_locales(package_root)) or "none"
        raise DatasetSpecError(
            f"debian-handbook {package_root.name.partition('_')[2]} has no {locale!r} translation (available: "
            f"{available}); use handbook:<one of these>."
        )
    documents = []
    for page in sorted(page_dir.glob("*.html")):
        if page.name in _SKIP_PAGES:
            continue
        title, paragraphs = extract_page(page.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            documents.append(Document(title or page.stem, "\n\n".join(paragraphs)))
    return documents
