"""Perplexity under KV-cache eviction: exact one-pass evaluation, its token-by-token reference, policy comparison.

The reference is what serving does: decode one token at a time with :class:`QFiltersCache`, which evicts after every
step. Because scores are static per key, which keys each query sees has a closed form (``qfilters.eviction``), so
:func:`perplexity` gets the *same* numbers from ONE forward pass: inside each compressible layer it scores that
layer's keys (computed, as in decoding, from the masked earlier layers) and attends under the per-head visibility
mask (applied block by block over the keys each block of queries can see, see :func:`evicted_attention`). At 2048
tokens that is one batched pass instead of 2048 sequential ones.

Scoring convention: the perplexity of a sequence is ``exp(mean NLL)`` of its last ``score_last`` tokens (all but the
first token when ``None``), each predicted from everything before it under the eviction policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qfilters.attention import attention_hook
from qfilters.errors import ModelError
from qfilters.eviction import check_budget, eviction_horizon, prepare_scores
from qfilters.scorers import Scorer

__all__ = ["PerplexityResult", "perplexity", "perplexity_reference", "eviction_hook", "EvalResult", "EvalRow",
           "evaluate_policies", "encode_document", "POLICIES"]

MASKABLE_KERNELS = ("sdpa",)  # kernels that take an arbitrary 4-D mask AND that qfilters.attention can hook


@dataclass
class PerplexityResult:
    """Summed NLL over scored tokens (pooled over the batch) and the same per sequence."""

    nll_sum: float
    n_tokens: int
    per_sequence: list[tuple[float, int]] = field(default_factory=list)  # (nll_sum, n_tokens) per batch row

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def per_sequence_perplexity(self) -> list[float]:
        return [math.exp(nll / n) for nll, n in self.per_sequence]


def _n_scored(length: int, score_last: int | None) -> int:
    if length < 2:
        raise ValueError(f"need at least 2 tokens to score a prediction, got a sequence of {length}")
    if score_last is None:
        return length - 1
    if isinstance(score_last, bool) or not isinstance(score_last, int) or not 1 <= score_last <= length - 1:
        raise ValueError(f"score_last must be an integer in [1, {length - 1}] for sequences of {length} tokens, "
                         f"got {score_last!r}")
    return score_last


def _result(logits: Tensor, targets: Tensor) -> PerplexityResult:
    """logits [B, n, V] predicting targets [B, n] -> NLL sums (float32 / float64 accumulation)."""
    batch, n, vocab = logits.shape
    flat = F.cross_entropy(logits.reshape(batch * n, vocab).float(), targets.reshape(batch * n), reduction="none")
    nll = flat.view(batch, n).double().sum(dim=1)  # [B]
    per = [(float(x), n) for x in nll.tolist()]
    return PerplexityResult(nll_sum=float(nll.sum()), n_tokens=n * len(per), per_sequence=per)


def _block_size(budget: int) -> int:
    # work ~ T * (budget + block), kernel calls ~ T / block: a block of about the budget balances the two
    return min(1024, max(128, budget))


def _given_block(given: Tensor, t0: int, t1: int, idx: Tensor) -> Tensor:
    """Rows t0:t1 of transformers' mask [b, h, T, T'], columns idx [B, H_kv, n] -> [B, H_kv, t1 - t0, n]."""
    rows = given[..., t0:t1, :]
    rows = rows.expand(idx.shape[0], idx.shape[1], rows.shape[-2], rows.shape[-1])
    return rows.gather(-1, idx[..., None, :].expand(-1, -1, t1 - t0, -1))


def evicted_attention(
    module: Any, query: Tensor, key: Tensor, value: Tensor, given_mask: Tensor | None, horizon: Tensor,
    base_fn: Any, block: int, **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention where query t sees key j iff j <= t <= horizon[j], by blocks of queries over compacted keys.

    Visibility of a key is an interval of queries, so a block [t0, t1) needs only the keys with j < t1 and
    horizon >= t0: at most budget + block of them. Gathering those per KV head (padded to the largest count, padding
    masked) costs O(T * (budget + block)) instead of a dense [T, T] mask, and never holds a T x T tensor.
    """
    q_heads, length = query.shape[1], query.shape[2]
    rep = q_heads // key.shape[1]  # repeat_kv order: query head h reads KV head h // rep
    t_all = torch.arange(length, device=query.device)
    outputs = []
    for t0 in range(0, length, block):
        t1 = min(length, t0 + block)
        relevant = horizon[..., :t1] >= t0  # [B, H_kv, t1]: keys some query of the block sees
        n = int(relevant.sum(dim=-1).max())
        # [B, H_kv, n]: indices of the relevant keys first, in position order (stable sort), then padding
        idx = torch.sort((~relevant).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        valid = relevant.gather(-1, idx)  # [B, H_kv, n]: False on padding
        k_blk = key.gather(2, idx[..., None].expand(-1, -1, -1, key.shape[-1]))  # [B, H_kv, n, D]
        v_blk = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[-1]))  # [B, H_kv, n, Dv]
        tq = t_all[t0:t1, None]  # [Tb, 1]
        vis = valid[..., None, :] & (idx[..., None, :] <= tq) & (tq <= horizon.gather(-1, idx)[..., None, :])
        # additive float mask: sdpa converts bool masks to this anyway, and eager-style kernels need it
        if given_mask is None:
            mask = torch.zeros(vis.shape, dtype=query.dtype, device=query.device)
        else:  # padding or other constraints transformers put in its own mask
            given = _given_block(given_mask, t0, t1, idx)  # [B, H_kv, Tb, n]
            mask = given.to(query.dtype) if given.is_floating_point() else torch.zeros(
                vis.shape, dtype=query.dtype, device=query.device)
            vis = vis if given.is_floating_point() else vis & given
        mask = mask.masked_fill(~vis, torch.finfo(query.dtype).min).repeat_interleave(rep, dim=1)  # [B, H_q, Tb, n]
        out, _ = base_fn(module, query[:, :, t0:t1], k_blk, v_blk, mask, **kwargs)  # [B, Tb, H_q, Dv]
        if out.shape[1] != t1 - t0:
            raise ModelError(f"attention kernel returned shape {tuple(out.shape)}; expected [B, T, H, D] outputs")
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def eviction_hook(
    model: Any, scorer: Scorer, budget: int, window: int, n_sinks: int = 0, uncompressed_layers: Sequence[int] = ()
) -> Any:
    """Attention hook applying greedy eviction to the model's compressible layers (others untouched)."""
    from qfilters.cache import layer_kinds

    kinds = layer_kinds(model, uncompressed_layers)

    def hook(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, base_fn: Any,
             **kwargs: Any) -> Any:
        if kinds[module.layer_idx] != "compress":
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        length = query.shape[2]
        if key.shape[2] != length:
            raise ModelError("the one-pass evaluator needs a cache-free forward (queries and keys of equal length)")
        positions = torch.arange(length, device=key.device)
        # scores of THIS layer's post-RoPE keys, computed from the evicted earlier layers exactly as in decoding
        scores = prepare_scores(scorer.score(key, module.layer_idx, positions), positions, n_sinks)  # [B, Hkv, T]
        horizon = eviction_horizon(scores, budget - window, window)  # [B, Hkv, T]
        kwargs.pop("is_causal", None)  # the mask says everything; never let the kernel add its own causal mask
        return evicted_attention(module, query, key, value, attention_mask, horizon, base_fn, _block_size(budget),
                                 **kwargs)

    return hook


def _check_inputs(model: Any, input_ids: Tensor, scorer: Scorer | None, budget: int, window: int, n_sinks: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    check_budget(budget, window, n_sinks)
    if scorer is not None:
        from qfilters.cache import model_dims

        scorer.check_model(*model_dims(model))


@torch.inference_mode()
def perplexity(
    model: Any,
    input_ids: Tensor,
    scorer: Scorer | None,
    budget: int,
    window: int,
    n_sinks: int = 0,
    score_last: int | None = None,
    uncompressed_layers: Sequence[int] = (),
) -> PerplexityResult:
    """Exact perplexity of token-by-token decoding under eviction, in one forward pass (``scorer=None``: full cache).

    Sequences no longer than ``budget`` never evict, so they take the plain forward (bit-identical to full cache).
    Needs an sdpa model (flash kernels take no arbitrary mask); the reference runs with any kernel.
    """
    _check_inputs(model, input_ids, scorer, budget, window, n_sinks)
    length = input_ids.shape[1]
    n = _n_scored(length, score_last)
    input_ids = input_ids.to(next(model.parameters()).device)
    if scorer is None or length <= budget:
        logits = model(input_ids, use_cache=False, logits_to_keep=n + 1).logits
    else:
        impl = str(model.config._attn_implementation).removeprefix("qfilters+")
        if impl not in MASKABLE_KERNELS:
            raise ModelError(f"the one-pass evaluator needs attn_implementation 'sdpa', not {impl!r}: "
                             "reload the model with attn_implementation='sdpa'")
        with attention_hook(model, eviction_hook(model, scorer, budget, window, n_sinks, uncompressed_layers)):
            logits = model(input_ids, use_cache=False, logits_to_keep=n + 1).logits
    return _result(logits[:, :n], input_ids[:, length - n :])  # logits [B, n+1, V]: the last one predicts nothing


@torch.inference_mode()
def perplexity_reference(
    model: Any,
    input_ids: Tensor,
    scorer: Scorer | None,
    budget: int,
    window: int,
    n_sinks: int = 0,
    score_last: int | None = None,
    uncompressed_layers: Sequence[int] = (),
) -> PerplexityResult:
    """Same quantity as :func:`perplexity`, by decoding one token at a time with :class:`QFiltersCache` (slow)."""
    from transformers import DynamicCache

    from qfilters.cache import QFiltersCache, cache_kwargs

    _check_inputs(model, input_ids, scorer, budget, window, n_sinks)
    length = input_ids.shape[1]
    n = _n_scored(length, score_last)
    input_ids = input_ids.to(next(model.parameters()).device)
    if scorer is None:
        cache: Any = DynamicCache(config=model.config)
    else:
        cache = QFiltersCache(model, scorer, budget, window, n_sinks, uncompressed_layers)
    skip_head = torch.empty(0, dtype=torch.long, device=input_ids.device)  # no LM head on unscored steps
    pass_cache = cache_kwargs(model, cache)
    logits = []
    for t in range(length - 1):
        scored = t >= length - 1 - n
        out = model(input_ids[:, t : t + 1], **pass_cache, use_cache=True,
                    logits_to_keep=1 if scored else skip_head)
        if scored:
            logits.append(out.logits[:, -1])  # [B, V] predicts token t + 1
    return _result(torch.stack(logits, dim=1), input_ids[:, length - n :])


# ---------------------------------------------------------------------------------------------- policy comparison
POLICIES = ("full", "qfilters", "knorm", "streamingllm", "random")


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
class EvalRow:
    policy: str
    budget: int
    perplexity: float
    gap: float  # perplexity - full-cache perplexity


@dataclass
class EvalResult:
    """Pooled and per-document perplexities of each policy x budget on the first chunk of each document."""

    config: dict[str, Any]
    titles: list[str]  # evaluated documents, in corpus order
    full_nll: list[float]  # per document, summed over its scored tokens
    nll: dict[tuple[str, int], list[float]]  # (policy, budget) -> per-document NLL sums
    tokens_per_doc: int
    skipped: list[str] = field(default_factory=list)  # documents shorter than seq_len

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(p for p, _ in self.nll))

    @property
    def budgets(self) -> list[int]:
        return sorted({b for _, b in self.nll})

    @property
    def full_perplexity(self) -> float:
        return math.exp(sum(self.full_nll) / (self.tokens_per_doc * len(self.full_nll)))

    def perplexity(self, policy: str, budget: int) -> float:
        """Pooled over documents: exp(sum NLL / sum tokens)."""
        if policy == "full":
            return self.full_perplexity
        if (policy, budget) not in self.nll:
            raise KeyError(f"no result for policy {policy!r} at budget {budget}; have {sorted(self.nll)}")
        return math.exp(sum(self.nll[policy, budget]) / (self.tokens_per_doc * len(self.titles)))

    def gap(self, policy: str, budget: int) -> float:
        return self.perplexity(policy, budget) - self.full_perplexity

    def gap_ratio(self, policy_a: str, policy_b: str, budget: int) -> float:
        """gap(a) / gap(b): below 1 means ``a`` loses less perplexity than ``b`` (inf / nan when gap(b) is 0)."""
        a, b = self.gap(policy_a, budget), self.gap(policy_b, budget)
        if b == 0:
            return math.nan if a == 0 else math.copysign(math.inf, a)
        return a / b

    @property
    def rows(self) -> list[EvalRow]:
        out = []
        for budget in self.budgets:
            out.append(EvalRow("full", budget, self.full_perplexity, 0.0))
            out += [EvalRow(p, budget, self.perplexity(p, budget), self.gap(p, budget)) for p in self.policies
                    if (p, budget) in self.nll]
        return out

    def per_document(self) -> list[dict[str, Any]]:
        n = self.tokens_per_doc
        docs = []
        for i, title in enumerate(self.titles):
            full = math.exp(self.full_nll[i] / n)
            ppl = {p: {str(b): math.exp(self.nll[p, b][i] / n) for b in self.budgets if (p, b) in self.nll}
                   for p in self.policies}
            docs.append({"title": title, "full": full, "perplexity": ppl})
        return docs

    def to_dict(self) -> dict[str, Any]:
        """JSON-able and deterministic (ordered lists, no timestamps)."""
        ratios = {}
        if {"qfilters", "streamingllm"} <= set(self.policies):
            ratios["qfilters/streamingllm"] = {str(b): _json_float(self.gap_ratio("qfilters", "streamingllm", b))
                                              for b in self.budgets}
        if {"qfilters", "knorm"} <= set(self.policies):
            ratios["qfilters/knorm"] = {str(b): _json_float(self.gap_ratio("qfilters", "knorm", b))
                                        for b in self.budgets}
        return {
            "config": self.config,
            "documents_evaluated": len(self.titles),
            "documents_skipped": list(self.skipped),
            "tokens_scored_per_policy": self.tokens_per_doc * len(self.titles),
            "full_perplexity": self.full_perplexity,
            "rows": [{"policy": r.policy, "budget": r.budget, "perplexity": r.perplexity, "gap": r.gap}
                     for r in self.rows],
            "gap_ratios": ratios,
            "documents": self.per_document(),
        }

    def table(self) -> Any:
        """rich Table: one row per policy, one column per budget, cells 'ppl (+gap)', plus gap(QF)/gap(StreamingLLM)."""
        from rich.table import Table

        table = Table(title=f"Perplexity under a KV budget ({len(self.titles)} documents, "
                            f"{self.tokens_per_doc} scored tokens each, window {self.config.get('window')})")
        table.add_column("policy")
        for b in self.budgets:
            table.add_column(f"budget {b}", justify="right")
        table.add_row("full cache", *[f"{self.full_perplexity:.3f}" for _ in self.budgets])
        for p in self.policies:
            table.add_row(p, *[f"{self.perplexity(p, b):.3f} ({self.gap(p, b):+.3f})" if (p, b) in self.nll else "-"
                               for b in self.budgets])
        if {"qfilters", "streamingllm"} <= set(self.policies):
            table.add_section()
            table.add_row("gap QF / gap StreamingLLM",
                          *[f"{self.gap_ratio('qfilters', 'streamingllm', b):.3f}" for b in self.budgets])
        return table


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def evaluate_policies(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    filters: Any,
    *,
    budgets: list[int],
    window: int,
    seq_len: int = 2048,
    score_last: int = 1024,
    n_sinks_streaming: int = 4,
    policies: Sequence[str] = ("full", "qfilters", "knorm", "streamingllm"),
    max_docs: int | None = None,
    progress: bool = True,
    uncompressed_layers: Sequence[int] = (),
    model_id: str | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Perplexity of each policy at each budget on the first ``seq_len`` tokens of each document (one-pass, exact).

    Documents shorter than ``seq_len`` tokens are skipped (listed in the result). ``filters`` (tensor or QFilters)
    is only needed for the ``qfilters`` policy. Full cache is computed once and is the reference of every gap.
    ``model_id`` names the model in the result (default: the config's ``_name_or_path``, a cache path for embedded
    models, so pass ``LoadedModel.info.model_id``). ``on_step(done, total)`` is called after every forward pass, so
    a caller can report progress and stop a long evaluation between two passes (by raising).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qfilters.cache import model_dims
    from qfilters.scorers import make_scorer

    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose among {list(POLICIES)}")
    if not budgets:
        raise ValueError("budgets must list at least one KV budget")
    for b in budgets:
        check_budget(b, window)
    _n_scored(seq_len, score_last)
    scorers: dict[str, Scorer] = {}
    for p in policies:
        if p == "full":
            continue
        kw = {"n_sinks": n_sinks_streaming} if p == "streamingllm" else {}
        scorers[p] = make_scorer(p, filters if p == "qfilters" else None, **kw)
        scorers[p].check_model(*model_dims(model))  # fail before hours of full-cache passes, not after

    titles, chunks, skipped = [], [], []
    for doc in corpus.documents:
        if max_docs is not None and len(titles) >= max_docs:
            break
        ids = encode_document(tokenizer, doc.text, seq_len)
        if len(ids) < seq_len:
            skipped.append(doc.title)
            continue
        titles.append(doc.title)
        chunks.append(torch.tensor(ids, dtype=torch.long)[None])  # [1, seq_len]
    if not chunks:
        raise ValueError(f"no document of {corpus!r} has {seq_len} tokens; lower seq_len "
                         f"({len(skipped)} documents skipped)")

    nll: dict[tuple[str, int], list[float]] = {}
    passes, total = 0, len(chunks) * (1 + len(scorers) * len(budgets))

    def step(bar: Any, task: Any) -> None:
        nonlocal passes
        passes += 1
        bar.advance(task)
        if on_step is not None:
            on_step(passes, total)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("full cache", total=len(chunks))
        full_nll = []
        for ids in chunks:
            full_nll.append(perplexity(model, ids, None, max(budgets), window, score_last=score_last).nll_sum)
            step(bar, task)
        for p, scorer in scorers.items():
            for b in budgets:
                task = bar.add_task(f"{p} @ {b}", total=len(chunks))
                nll[p, b] = []
                for ids in chunks:
                    res = perplexity(model, ids, scorer, b, window, score_last=score_last,
                                     uncompressed_layers=uncompressed_layers)
                    nll[p, b].append(res.nll_sum)
                    step(bar, task)

    config = {
        "model": model_id or str(getattr(model.config, "_name_or_path", "")),
        "corpus": str(getattr(corpus, "spec", "")),
        "corpus_sha256": str(getattr(corpus, "sha256", "")),
        "budgets": sorted(budgets),
        "window": window,
        "seq_len": seq_len,
        "score_last": score_last,
        "n_sinks_streaming": n_sinks_streaming,
        "policies": list(policies),
        "uncompressed_layers": sorted(set(uncompressed_layers)),
        "bos": "prepended when the tokenizer has one and does not add it",
        "scorers": {p: s.describe() for p, s in scorers.items()},
    }
    return EvalResult(config=config, titles=titles, full_nll=full_nll, nll=nll, tokens_per_doc=score_last,
                      skipped=skipped)
