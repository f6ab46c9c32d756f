"""The corpus value types every loader returns.

A corpus is an ordered list of documents plus where it came from. Its ``sha256`` covers only the document contents,
so an artifact calibrated on a corpus can record exactly which text it saw, independent of cache paths or machines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

# Bump only if the hashing scheme itself changes (it would change every recorded corpus hash).
_HASH_DOMAIN = b"qfilters-corpus-v1\n"


@dataclass(frozen=True)
class Document:
    """One unit of text: a web page, a book, a source file, one JSONL record."""

    title: str
    text: str


@dataclass
class Corpus:
    """An ordered collection of documents, identified by its normalized spec and content hash.

    ``documents`` is a plain list for convenience; treat it as read-only (``sha256`` is recomputed on access, so it
    always describes the current contents).
    """

    spec: str
    documents: list[Document]
    source: str
    # free-form, JSON-friendly facts about the corpus (package versions, file counts ...); not part of the hash
    metadata: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    @property
    def num_chars(self) -> int:
        """Total characters of document text (titles excluded)."""
        return sum(len(doc.text) for doc in self.documents)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 over titles and texts in order, each length-prefixed so no two corpora can collide by
        shifting text between a title and a text or between neighbouring documents."""
        return content_sha256(self.documents)

    def __repr__(self) -> str:  # the default repr would dump megabytes of text
        return (
            f"Corpus(spec={self.spec!r}, documents={len(self.documents)}, chars={self.num_chars}, "
            f"source={self.source!r})"
        )


def content_sha256(documents: list[Document]) -> str:
    """Hash document titles and texts with unambiguous length-prefixed framing."""
    digest = hashlib.sha256(_HASH_DOMAIN)
    digest.update(len(documents).to_bytes(8, "big"))
    for doc in documents:
        for tag, value in ((b"T", doc.title), (b"X", doc.text)):
            data = value.encode("utf-8", "surrogatepass")
            digest.update(tag)
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()
