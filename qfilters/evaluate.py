"""Policy comparison: perplexity of each eviction policy x budget on evaluation chunks, pooled, with full cache
as the reference of every gap.

One engine, :func:`evaluate_chunks`, runs the exact one-pass evaluator (:mod:`qfilters.onepass`) over chunks for a
set of named policies; ``qfilters eval`` (:func:`evaluate_policies`), the validator's sweeps and its transfer matrix
are all lists of policies handed to it.

Scoring convention: the perplexity of a sequence is ``exp(mean NLL)`` of its last ``score_last`` tokens, each
predicted from everything before it under the eviction policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qfilters.data.chunks import EvalChunks, encode_document, select_chunks
from qfilters.onepass import PerplexityResult, perplexity, perplexity_reference, scored_tokens
from qfilters.policy import EvictionPolicy, PolicyLike, check_budget
from qfilters.policy_table import FULL, POLICY_TABLE, RECIPE, ScorerInputs, build_scorer, compared_policies

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from qfilters.artifact import QFilters
    from qfilters.data import Corpus
    from qfilters.moments import QueryMoments

__all__ = ["EvalChunks", "EvalResult", "EvalRow", "PerplexityResult", "encode_document", "evaluate_chunks",
           "evaluate_policies", "perplexity", "perplexity_reference", "select_chunks"]

OnStep = Callable[[int, int], None]


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

    def table(self) -> Table:
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


def evaluate_chunks(
    model: PreTrainedModel,
    chunks: EvalChunks,
    policies: Mapping[tuple[str, int], PolicyLike],
    *,
    score_last: int,
    full_nll: Sequence[float] | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    on_step: OnStep | None = None,
) -> EvalResult:
    """Perplexity of each ``(name, budget) -> policy`` on every chunk, plus the full cache (one-pass, exact).

    ``full_nll`` reuses a full-cache pass already made on the same chunks (per chunk NLL sums). ``on_step(done,
    total)`` is called after every forward pass, so a caller can report progress and stop between two passes
    (by raising).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    scored_tokens(chunks.seq_len, score_last)
    for policy in {id(p): p for p in policies.values()}.values():
        policy.check_model(model)  # fail before hours of passes, not after
    passes, total = 0, len(chunks) * ((full_nll is None) + len(policies))

    def run(bar: Progress, label: str, policy: PolicyLike | None) -> list[float]:
        nonlocal passes
        task, out = bar.add_task(label, total=len(chunks)), []
        for ids in chunks.ids:
            out.append(perplexity(model, ids, policy, score_last=score_last).nll_sum)
            passes += 1
            bar.advance(task)
            if on_step is not None:
                on_step(passes, total)
        return out

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # bars on stderr: stdout is the caller's (``qfilters eval --json > result.json`` must stay valid JSON)
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False) as bar:
        full = list(full_nll) if full_nll is not None else run(bar, "full cache", None)
        nll = {(name, budget): run(bar, f"{name} @ {budget}", policy) for (name, budget), policy in policies.items()}
    return EvalResult(config=dict(config or {}), titles=list(chunks.titles), full_nll=full, nll=nll,
                      tokens_per_doc=score_last, skipped=list(chunks.skipped))


def evaluate_policies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    filters: QFilters | Tensor | None,
    *,
    budgets: list[int],
    window: int,
    seq_len: int = 2048,
    score_last: int = 1024,
    n_sinks_streaming: int = 4,
    policies: Sequence[str] | None = None,
    max_docs: int | None = None,
    progress: bool = True,
    uncompressed_layers: Sequence[int] = (),
    model_id: str | None = None,
    on_step: OnStep | None = None,
    query_stats: QueryMoments | None = None,
) -> EvalResult:
    """Perplexity of each named policy at each budget on the first ``seq_len`` tokens of each document.

    ``policies`` are policy-table names (default: the full cache and the table's comparison: Q-Filters, K-norm,
    StreamingLLM). Documents shorter than ``seq_len`` tokens are skipped (listed in the result). ``filters`` (tensor
    or QFilters) is only needed for ``qfilters``, ``query_stats`` for the moment scorers. ``model_id`` names the
    model in the result (default: the config's ``_name_or_path``, a cache path for embedded models, so pass
    ``LoadedModel.info.model_id``).
    """
    recipe = getattr(filters, "recipe", None)  # a validated filter set's searched recipe: compared by default
    names = list(policies) if policies is not None else [
        FULL, *compared_policies(), *([RECIPE] if recipe is not None else [])]
    if RECIPE in names and recipe is None:
        raise ValueError("the 'recipe' policy needs filters that carry one (qfilters validate --search-recipe)")
    unknown = [p for p in names if p not in POLICY_TABLE]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose among {list(POLICY_TABLE)}")
    if not budgets:
        raise ValueError("budgets must list at least one KV budget")
    for b in budgets:
        check_budget(b, window)
    scored_tokens(seq_len, score_last)
    rope = None
    if any("rope" in POLICY_TABLE[p].needs for p in names):  # content novelty: RoPE undone with the model's own
        from qfilters.rope import rope_frequencies

        rope = rope_frequencies(model)
    inputs = ScorerInputs(filters=filters, query_stats=query_stats, n_sinks=n_sinks_streaming, rope=rope)
    scorers = {p: build_scorer(p, inputs) for p in names if p not in (FULL, RECIPE)}
    layers = tuple(uncompressed_layers)
    grid: dict[tuple[str, int], PolicyLike] = {
        (p, b): EvictionPolicy(s, b, window, uncompressed_layers=layers) for p, s in scorers.items() for b in budgets}
    compare_recipe = recipe if RECIPE in names else None  # per layer: own windows and sinks, whole layers at seq_len
    if compare_recipe is not None:
        grid.update({(RECIPE, b): p for b, p in compare_recipe.policies(budgets, model, inputs, seq_len).items()})
    chunks = select_chunks(tokenizer, corpus, seq_len, max_docs)
    config = {
        "model": model_id or str(getattr(model.config, "_name_or_path", "")),
        "corpus": str(getattr(corpus, "spec", "")),
        "corpus_sha256": str(getattr(corpus, "sha256", "")),
        "budgets": sorted(budgets),
        "window": window,
        "seq_len": seq_len,
        "score_last": score_last,
        "n_sinks_streaming": n_sinks_streaming,
        "policies": names,
        "uncompressed_layers": sorted(set(uncompressed_layers)),
        "bos": "prepended when the tokenizer has one and does not add it",
        "scorers": {p: s.describe() for p, s in scorers.items()},
    }
    if compare_recipe is not None:
        config[RECIPE] = compare_recipe.to_dict()
    return evaluate_chunks(model, chunks, grid, score_last=score_last, config=config, progress=progress,
                           on_step=on_step)
