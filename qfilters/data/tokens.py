"""Turn a corpus into fixed-length token chunks under a token budget, tokenizing lazily.

Calibration only needs ``max_tokens`` tokens, so documents are tokenized in order and only until the budget is
met, and each document is fed to the tokenizer in pieces of a few thousand characters cut at paragraph (then line,
then word) boundaries, keeping memory bounded on multi-megabyte documents. Pieces concatenate back to the exact
document text, so the token stream matches whole-document tokenization except possibly at piece boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from qfilters.data.corpus import Corpus, Document

#: Characters per tokenizer call (roughly 1k tokens: below every model's max length, so no length warnings).
PIECE_CHARS = 4000


def iter_token_chunks(
    tokenizer: Any,
    corpus: Corpus | Iterable[Document],
    seq_len: int,
    max_tokens: int | None = None,
    add_bos: bool = True,
) -> Iterator[list[int]]:
    """An iterator over lists of exactly ``seq_len`` token ids from the concatenated corpus, in document order.

    Documents are joined into one stream: each starts with BOS when ``add_bos`` and the tokenizer has a BOS token;
    otherwise consecutive documents are separated by EOS (or by the tokens of a blank line if there is no EOS).
    At most ``max_tokens`` tokens are produced in total, as ``max_tokens // seq_len`` full chunks; only when the
    corpus runs out first is the last chunk shorter. Deterministic for a given tokenizer and corpus.

    ``tokenizer`` needs ``encode(text, add_special_tokens=False)`` (any ``transformers`` tokenizer) and optionally
    ``bos_token_id``/``eos_token_id``. Bad arguments raise ``ValueError`` at call time, not on first iteration.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"max_tokens={max_tokens} is smaller than seq_len={seq_len}, so not even one chunk fits; "
                         "raise max_tokens or lower seq_len")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    eos = getattr(tokenizer, "eos_token_id", None)
    documents = corpus.documents if isinstance(corpus, Corpus) else corpus
    # arguments are checked above, eagerly; the generator below does the lazy work
    return _chunks(tokenizer, documents, seq_len, max_tokens if max_tokens is not None else -1, bos, eos)


def _chunks(
    tokenizer: Any, documents: Iterable[Document], seq_len: int, remaining: int, bos: int | None, eos: int | None
) -> Iterator[list[int]]:
    """The chunking generator; ``remaining`` is the token budget, -1 for unlimited."""
    separator = [eos] if eos is not None else _encode(tokenizer, "\n\n")
    buffer: list[int] = []
    for index, document in enumerate(documents):
        if bos is not None:
            buffer.append(bos)
        elif index > 0:
            buffer.extend(separator)
        for piece in split_text(document.text, PIECE_CHARS):
            buffer.extend(_encode(tokenizer, piece))
            while len(buffer) >= seq_len:
                yield buffer[:seq_len]
                del buffer[:seq_len]
                if remaining >= 0:
                    remaining -= seq_len
                    if remaining < seq_len:
                        return  # the budget cannot fit another full chunk
    if buffer:  # corpus exhausted with budget left: one final, shorter chunk
        yield buffer


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Consecutive pieces of at most ``max_chars`` whose concatenation is ``text``, cut preferably right after a
    blank line, else after a newline, else after a space."""
    start, length = 0, len(text)
    while length - start > max_chars:
        window_end = start + max_chars
        for boundary in ("\n\n", "\n", " "):
            cut = text.rfind(boundary, start, window_end)
            if cut > start:
                end = cut + len(boundary)
                break
        else:
            end = window_end
        yield text[start:end]
        start = end
    if start < length:
        yield text[start:]


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(ids, "ids", ids))  # tokenizers.Encoding has .ids; transformers returns a list
