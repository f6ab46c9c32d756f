"""Evaluation chunks: the first ``seq_len`` tokens of each long-enough document, chosen by one rule.

``qfilters eval``, the validator and the research scripts all score these chunks, so they always score the same
tokens of the same documents. Torch is imported only when chunks are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["EvalChunks", "encode_document", "select_chunks"]


def encode_document(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of a document, starting with BOS when the tokenizer has one.

    BOS rule (same for every model): tokenize with the tokenizer's own special tokens, then prepend ``bos_token_id``
    if it exists and is not already first (SmolLM2 adds nothing itself, Gemma-3 adds ``<bos>``). Only a prefix of the
    text is tokenized (whole novels are slow to encode); it is grown until it yields a safe margin of extra tokens,
    so the result equals the first tokens of the whole text.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    n_chars = 8 * max_tokens + 64
    while True:
        prefix = text[:n_chars]
        ids = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if len(prefix) == len(text) or len(ids) >= max_tokens + 64:  # 64 tokens margin: the cut only moves the tail
            return ids[:max_tokens]
        n_chars *= 2


@dataclass
class EvalChunks:
    """Token chunks ``[1, seq_len]`` of the evaluated documents, in corpus order, and the documents skipped."""

    seq_len: int
    titles: list[str] = field(default_factory=list)
    ids: list[Tensor] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # documents shorter than seq_len

    def __len__(self) -> int:
        return len(self.ids)


def select_chunks(tokenizer: Any, corpus: Any, seq_len: int, max_docs: int | None = None) -> EvalChunks:
    """The first ``seq_len`` tokens of each document that has that many, up to ``max_docs`` documents.

    ValueError when no document is long enough (the message says how many were skipped).
    """
    import torch

    chunks = EvalChunks(seq_len)
    for doc in corpus.documents:
        if max_docs is not None and len(chunks) >= max_docs:
            break
        ids = encode_document(tokenizer, doc.text, seq_len)
        if len(ids) < seq_len:
            chunks.skipped.append(doc.title)
            continue
        chunks.titles.append(doc.title)
        chunks.ids.append(torch.tensor(ids, dtype=torch.long)[None])  # [1, seq_len]
    if not chunks.ids:
        raise ValueError(f"no document of {corpus!r} has {seq_len} tokens; lower seq_len "
                         f"({len(chunks.skipped)} documents skipped)")
    return chunks
