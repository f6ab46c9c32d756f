"""The validator's recipe search: which eviction recipe to ship with a filter set, chosen on calibration text only.

At each budget of the sweep, a coordinate search (axis by axis from a fixed start, pass after pass until one changes
nothing, at most :data:`MAX_PASSES`; ties broken by the recipe's label so the result is deterministic) over the
scorer, novelty blended into it, an age discount (a soft recent window), the recent-window share, the sinks, the
per-layer allocation (uniform, pyramid, or by each layer's measured sensitivity), whole first layers, novelty
alone in the later layers and in the recall heads (the KV heads that read a passkey most, measured once on
:data:`RECALL_TRIALS` passkeys in the first calibration dataset), at the same total KV memory, scored by the exact
one-pass perplexity on the first documents of the calibration datasets (the text the filters were fitted on: the
search never reads evaluation text).
The layer sensitivity is measured once, on the first search document, when the search first needs it, and stored
with the recipes only when a chosen one allocates by it; likewise each KV head's (one pass per compressed KV head, at
the sweep's middle budget: :func:`head_budget`); so are the scorers' spreads a blend or an age discount needs
(:func:`qfilters.recipes.score_spread`, full cache on the same document). The chosen recipes are then measured on
the held-out evaluation datasets beside the stock policies, like every other row.

The stock policy is a candidate as well, so the shipped default is never worse than stock on the search text; held-out
datasets where it is worse than stock get a warning in the report. Only scorers a filter set carries without extra files
are searched (Q-Filters and K-norm; novelty needs nothing), so a published artifact stays loadable by kvpress and the
official code; its recipe lives in ``qfilters.json``.

Retrieval gate (when the validation runs the passkey test): perplexity alone ships recipes that drop one-off details (a
passkey) sooner than StreamingLLM does. So, at each budget, the perplexity winner and its variants that rank the last
layers by novelty (:data:`NOVELTY_SHARES`) or switch other numbers of recall heads to novelty (:data:`RECALL_SHARES`)
are run through the passkey test with calibration text as filler. Among the candidates within
:data:`GATE_PERPLEXITY_TOLERANCE` of the winner's search perplexity, the recipe shipped is the one that makes the keys
most likely (mean teacher-forced log-probability of the key's tokens, ties to the lower perplexity), provided it
beats StreamingLLM's; when none does, the perplexity winner (the report says so). Why the log-probability and not
the needles found: on technical calibration text (SmolLM2 on handbook:en) no policy, not even attention-based SnapKV,
retrieves a needle that is not recent at 4x or 8x, so the count only measures the recent window; the key's
log-probability still orders the candidates as held-out prose's needle counts do (BENCHMARKS.md, "Recall heads").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qfilters.policy_table import RECIPE, ScorerInputs
from qfilters.recipes import BLENDABLE, Recipe, RecipeBook
from qfilters.validation.gates import ValidationInputError
from qfilters.validation.progress import Progress, ProgressFn
from qfilters.validation.sweeps import BASELINE, sweep_policies

if TYPE_CHECKING:
    from qfilters.data import Corpus
    from qfilters.data.chunks import EvalChunks
    from qfilters.models import LoadedModel
    from qfilters.policy import LayerwisePolicy
    from qfilters.validation.schema import PerplexityReport, RecipeReport
    from qfilters.validation.settings import ValidationSettings

__all__ = ["RecipeSearch", "recipe_policies", "recipe_report", "recipe_warnings", "search_recipes", "stock_recipe"]

START = Recipe("qfilters", window_share=0.25, n_sinks=4, allocation="uniform", novelty_scorer="content-novelty")
AXES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("scorer", ("qfilters", "knorm")),
    # novelty blended into the scorer (each score in units of its spread on calibration text): keeps the keys queries
    # read AND the one-off ones; tuned before the window, sinks and allocation, which it changes
    ("novelty_weight", (0.0, 0.5, 1.0)),
    # what novelty reads: the keys' content with RoPE undone (measured better on SmolLM2, for perplexity and for
    # passkeys) or the cached keys (a model without RoPE has only these: content recipes are infeasible there)
    ("novelty_scorer", ("content-novelty", "novelty")),
    # a soft recent window: an old key's score falls by this many spreads per layer budget of newer keys
    ("recency_weight", (0.0, 0.125, 0.25, 0.5)),
    ("window_share", (0.125, 0.25, 0.5)),
    ("n_sinks", (0, 4)),
    # "head": per KV head by measured sensitivity (heads differ more than layers: on SmolLM2 it halved the held-out
    # gap on code and scripture at the same memory, BENCHMARKS.md "Per-head budgets with a uniform floor")
    ("allocation", ("uniform", "pyramid", "sensitivity", "head")),
    ("full_layers", (0, 1)),
    ("novelty_layers", (0.0, 0.5)),  # novelty in the later half: measured to help perplexity at 4x on SmolLM2
    # recall heads ranked by novelty alone (shares of the compressed KV heads, turned into counts by recall_counts,
    # ranked on calibration passkeys): on SmolLM2 they keep needles AND lose less perplexity than the blend they replace
    ("recall_heads", (0.0, 0.05, 0.1, 0.2)),
)
#: passes over the axes at most (the search stops at the first pass that changes nothing; repeated recipes cost
#: nothing). 3 stopped SmolLM2's search at 128 one move short: the age weight moved after the novelty-scorer axis
MAX_PASSES = 5
#: shares of the last compressed layers ranked by novelty, tried by the retrieval gate
NOVELTY_SHARES = (0.5, 1.0)
#: shares of the compressed KV heads switched to novelty as recall heads (at least one), searched and tried by the gate
RECALL_SHARES = tuple(v for axis, values in AXES if axis == "recall_heads" for v in values if v)
#: calibration-text passkeys that rank the recall heads (seeded apart from the gate's own trials)
RECALL_TRIALS = 16
#: the search perplexity the retrieval gate may give up, as a share of the winner's, for more likely keys
GATE_PERPLEXITY_TOLERANCE = 0.01


@dataclass
class RecipeSearch:
    """What the search chose per budget, and everything it measured to choose it."""

    book: RecipeBook
    documents: list[str]  # "spec: title" of the calibration documents searched on
    full_perplexity: float
    streamingllm: dict[int, float]  # the baseline on the same text, per budget
    chosen_perplexity: dict[int, float]  # the chosen recipe's, per budget
    trace: list[dict[str, Any]] = field(default_factory=list)  # every (budget, recipe, perplexity) evaluated
    sensitivity: list[float] | None = None  # per compressible layer, when the search measured it
    head_sensitivity: list[list[float]] | None = None  # [layer][KV head], when the search measured it
    head_budgets: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # (min, median, max) keys per KV
    # head, per budget whose chosen recipe allocates by KV head
    score_spread: dict[str, Any] | None = None  # per scorer [layer][KV head], when a blend was tried
    retrieval: RetrievalGate | None = None  # the passkey check on calibration text, when the validation runs one
    passes: dict[int, int] = field(default_factory=dict)  # passes over the axes, per budget
    converged: dict[int, bool] = field(default_factory=dict)  # False where MAX_PASSES stopped a search still moving
    needle_attention: tuple[tuple[float, ...], ...] | None = None  # [layer][KV head], when the gate measured it
    compressed_layers: tuple[int, ...] | None = None  # the layers a recipe compresses (None: every layer of the table)


@dataclass
class RetrievalGate:
    """Needles retrieved on calibration text, per budget: StreamingLLM's and each candidate recipe's (by label)."""

    filler: str
    trials: int
    context_tokens: int
    streamingllm: dict[int, int]
    candidates: dict[int, dict[str, int]]
    skipped: str | None = None  # why the gate did not run (calibration text too short for the contexts)
    # mean log-probability of the key's tokens, teacher-forced: StreamingLLM's and each candidate's, per budget
    streamingllm_logprob: dict[int, float] = field(default_factory=dict)
    candidate_logprob: dict[int, dict[str, float]] = field(default_factory=dict)


def stock_recipe(budget: int, settings: ValidationSettings) -> Recipe:
    """``qfilters eval``'s policy as a recipe: Q-Filters, the settings' window at this budget, no sinks, uniform."""
    return Recipe("qfilters", window_share=settings.window_for(budget) / budget, n_sinks=0, allocation="uniform")


def recipe_warnings(reports: Sequence[PerplexityReport]) -> list[str]:
    """Held-out datasets where the searched recipe loses more perplexity than StreamingLLM (recency is the better bet
    on such text) or than stock Q-Filters, per budget."""
    out = []
    for r in reports:
        rows = {(x.policy, x.budget): x.gap for x in r.rows}
        beaten, worse = (_recipe_loses_to(rows, other) for other in (BASELINE, "qfilters"))
        if beaten:
            out.append(f"On {r.dataset.spec}, the searched recipe loses more perplexity than StreamingLLM at "
                       f"budget(s) {', '.join(map(str, beaten))}: there, keeping the sinks and the most recent "
                       "tokens is the better eviction for this kind of text.")
        if worse:
            out.append(f"On {r.dataset.spec}, the searched recipe loses more perplexity than stock Q-Filters at "
                       f"budget(s) {', '.join(map(str, worse))}: there, QFiltersCache(..., recipe=None) is better.")
    return out


def _recipe_loses_to(gaps: dict[tuple[str, int | None], float], other: str) -> list[int]:
    """The budgets where the recipe's perplexity gap exceeds ``other``'s."""
    return sorted(b for (p, b), gap in gaps.items()
                  if p == RECIPE and b is not None and (other, b) in gaps and gap > gaps[other, b])


def recipe_policies(book: RecipeBook, filters: Any, model: Any, budgets: Sequence[int], context_length: int
                    ) -> dict[tuple[str, int], LayerwisePolicy]:
    """The chosen recipe at every budget, as rows of the evaluation engine."""
    return {(RECIPE, b): p for b, p in book.policies(budgets, model, ScorerInputs(filters=filters),
                                                      context_length).items()}


def _search_chunks(lm: LoadedModel, corpora: Sequence[Corpus], settings: ValidationSettings) -> EvalChunks:
    from qfilters.data.chunks import EvalChunks, select_chunks

    merged = EvalChunks(settings.eval_seq_len)
    for corpus in corpora:
        part = select_chunks(lm.tokenizer, corpus, settings.eval_seq_len, settings.recipe_docs)
        merged.titles += [f"{corpus.spec}: {t}" for t in part.titles]
        merged.ids += part.ids
    return merged


def search_recipes(lm: LoadedModel, corpora: Sequence[Corpus], filters: Any, budgets: Sequence[int],
                   settings: ValidationSettings, notify: ProgressFn) -> RecipeSearch:
    """Coordinate search at every budget on the calibration datasets' first documents (see the module doc)."""
    from qfilters.architecture import compressed_layers, model_dims
    from qfilters.evaluate import evaluate_chunks

    chunks = _search_chunks(lm, corpora, settings)
    label = f"{len(chunks)} calibration document(s)"
    layers = tuple(compressed_layers(lm.model))
    n_layers = len(layers)
    needles = measure_needles(lm, corpora[0], settings, notify)  # None when the text is too short for passkeys
    counts = recall_counts(lm.model) if needles is not None else ()  # no passkeys to rank heads on: no recall heads
    axes: list[tuple[str, tuple[Any, ...]]] = [
        (axis, (0, *counts) if axis == "recall_heads" else values) for axis, values in AXES
        if axis != "recall_heads" or counts]
    # an upper bound (repeated recipes are cached): the full pass; per budget StreamingLLM, the start, each pass's new
    # axis values, stock and the retrieval gate's novelty and recall variants; the sensitivity's pass per layer
    per_budget = 3 + MAX_PASSES * sum(len(v) - 1 for _, v in axes) + len(NOVELTY_SHARES) + len(RECALL_SHARES)
    n_heads = model_dims(lm.model)[1]
    steps = 1 + len(budgets) * per_budget + n_layers + n_layers * n_heads
    done = 0

    def step(detail: str = "") -> None:
        nonlocal done
        done += 1
        notify(Progress("recipe", label, min(done, steps), steps, detail))

    def run(policies: dict[tuple[str, int], Any], full_nll: Any = None) -> Any:
        result = evaluate_chunks(lm.model, chunks, policies, score_last=settings.score_last, full_nll=full_nll)
        step()
        return result

    notify(Progress("recipe", label, 0, steps, f"budgets {', '.join(map(str, budgets))}"))
    full = run({})
    sensitivity: list[float] = []  # measured once, when a recipe first allocates by it (see measure_sensitivity)
    heads: list[list[float]] = []  # likewise per KV head (see measure_head_sensitivity)
    spread: dict[str, Any] = {}  # measured once, when a recipe first blends (see measure_spread)
    streaming: dict[int, float] = {}
    trace: list[dict[str, Any]] = []
    chosen: dict[int, Recipe] = {}
    seen_by_budget: dict[int, dict[Recipe, float]] = {}
    passes: dict[int, int] = {}
    converged: dict[int, bool] = {}

    def score(recipe: Recipe, budget: int) -> float:
        seen = seen_by_budget.setdefault(budget, {})
        recipe = _canonical(recipe)  # which novelty a recipe would read changes nothing when it reads none
        if recipe not in seen:
            try:
                policy = _policy(recipe, budget, settings.eval_seq_len)
            except ValueError:  # not feasible at this budget (the sinks and a window do not fit)
                seen[recipe] = math.inf
            else:
                seen[recipe] = run({(RECIPE, budget): policy}, full.full_nll).perplexity(RECIPE, budget)
            trace.append({"budget": budget, "label": recipe.label, "recipe": recipe.to_dict(),
                          "perplexity": seen[recipe]})
        return seen[recipe]

    def _policy(recipe: Recipe, budget: int, context_length: int) -> LayerwisePolicy:
        if recipe.allocation == "sensitivity" and not sensitivity:
            sensitivity.extend(measure_sensitivity(lm, chunks, filters, min(budgets), settings,
                                                   full.full_nll[0], lambda: step("layer sensitivity")))
        if recipe.allocation == "head" and not heads:
            heads.extend(measure_head_sensitivity(lm, chunks, filters, head_budget(budgets), settings,
                                                  full.full_nll[0], lambda: step("KV-head sensitivity")))
        if recipe.spreads_needed() and not spread:
            spread.update(measure_spread(lm, chunks, filters))
        weights = tuple(sensitivity) if recipe.allocation == "sensitivity" else None
        book = RecipeBook({budget: recipe}, weights, score_spread=spread if recipe.spreads_needed() else None,
                          needle_attention=needles if recipe.recall_heads else None,
                          head_sensitivity=_table(heads) if recipe.allocation == "head" else None)
        return book.policy(budget, lm.model, ScorerInputs(filters=filters), context_length)

    for budget in sorted(budgets):
        baseline = sweep_policies(filters, [budget], settings, [BASELINE])  # the sweep's own StreamingLLM
        streaming[budget] = run(baseline, full.full_nll).perplexity(BASELINE, budget)
        best, passes[budget] = START, 0
        while passes[budget] < MAX_PASSES:  # until a whole pass changes nothing: an axis tried early (the blend at
            passes[budget] += 1              # the start's window) can win once later axes have moved
            before = best
            for axis, values in axes:
                best = min((replace(best, **{axis: v}) for v in values), key=lambda r: (score(r, budget), r.label))
            if best == before:
                break
        converged[budget] = best == before
        # the stock policy (Q-Filters, window min(window, b // 2), no sinks) is a candidate too: a search that
        # cannot beat it on its own text ships it, so the default never gets worse than stock there
        best = min((best, stock_recipe(budget, settings)), key=lambda r: (score(r, budget), r.label))
        if not math.isfinite(score(best, budget)):
            raise ValidationInputError(f"no eviction recipe fits a budget of {budget} keys: raise the budget")
        chosen[budget] = best
    retrieval = None
    if settings.passkey_trials:
        candidates = {b: [r, *(replace(r, novelty_layers=v) for v in NOVELTY_SHARES if v != r.novelty_layers),
                          *(replace(r, recall_heads=k) for k in counts
                            if r.scorer in BLENDABLE and k != r.recall_heads)]
                      for b, r in chosen.items()}
        for b, recipes in candidates.items():  # their perplexity first: an infeasible variant is no candidate
            candidates[b] = [r for r in recipes if math.isfinite(score(r, b))]
        retrieval = retrieval_gate(lm, corpora[0], filters, candidates, _policy, settings, notify)
        chosen = {b: _gated(recipes, b, retrieval, score) for b, recipes in candidates.items()}
    chosen = {b: _canonical(r) for b, r in chosen.items()}  # stored as older versions wrote it
    chosen_ppl = {b: score(r, b) for b, r in chosen.items()}
    spans = _head_spans(chosen, lambda r, b: _policy(r, b, settings.eval_seq_len), n_heads)
    notify(Progress("recipe", label, steps, steps))
    specs = ", ".join(c.spec for c in corpora)
    used = any(r.allocation == "sensitivity" for r in chosen.values())
    by_head = any(r.allocation == "head" for r in chosen.values())
    spreads_read = set().union(*(r.spreads_needed() for r in chosen.values()))
    recall = any(r.recall_heads for r in chosen.values())
    book = RecipeBook(chosen, tuple(sensitivity) if used else None, context_length=settings.eval_seq_len,
                      searched_on=f"{specs} (calibration text: {len(chunks)} x {settings.eval_seq_len} tokens, "
                                  f"last {settings.score_last} scored)",
                      score_spread={k: v for k, v in spread.items() if k in spreads_read} if spreads_read else None,
                      needle_attention=needles if recall else None,
                      head_sensitivity=_table(heads) if by_head else None)
    return RecipeSearch(book=book, documents=list(chunks.titles), full_perplexity=full.full_perplexity,
                        streamingllm=streaming, chosen_perplexity=chosen_ppl, trace=trace,
                        sensitivity=list(sensitivity) or None, head_sensitivity=[list(r) for r in heads] or None,
                        score_spread=dict(spread) or None,
                        retrieval=retrieval, passes=passes, converged=converged, head_budgets=spans,
                        needle_attention=needles, compressed_layers=layers)


def _canonical(recipe: Recipe) -> Recipe:
    """``recipe`` with the default novelty scorer when it reads no novelty (the same policy, one memo entry)."""
    return recipe if recipe.reads_novelty else replace(recipe, novelty_scorer="novelty")


def _gated(recipes: list[Recipe], budget: int, gate: RetrievalGate, score: Any) -> Recipe:
    """Among the recipes within :data:`GATE_PERPLEXITY_TOLERANCE` of the first's search perplexity (the winner's),
    the one whose keys are most likely, if more likely than StreamingLLM's; else the first."""
    if gate.skipped is not None:
        return recipes[0]
    logprob = gate.candidate_logprob.get(budget, {})
    limit = score(recipes[0], budget) * (1 + GATE_PERPLEXITY_TOLERANCE)
    passing = [r for r in recipes if r.label in logprob and score(r, budget) <= limit
               and logprob[r.label] > gate.streamingllm_logprob[budget]]
    return min(passing, key=lambda r: (-logprob[r.label], score(r, budget), r.label)) if passing else recipes[0]


def retrieval_gate(lm: LoadedModel, corpus: Corpus, filters: Any, candidates: dict[int, list[Recipe]],
                   policy_of: Any, settings: ValidationSettings, notify: ProgressFn) -> RetrievalGate:
    """The passkey test (the validation's needles and context length) with ``corpus`` (calibration text) as filler:
    StreamingLLM and every candidate recipe, per budget, all on the same prefills."""
    from qfilters.passkey import make_trials, run_passkey

    context = settings.resolved_passkey_context()
    gate = RetrievalGate(filler=corpus.spec, trials=settings.passkey_trials, context_tokens=context,
                         streamingllm={}, candidates={b: {} for b in candidates})
    text = "\n".join(d.text for d in corpus.documents)
    try:
        trials = make_trials(lm.tokenizer, text, settings.passkey_trials, context, settings.seed)
    except ValueError as e:
        gate.skipped = str(e)
        return gate
    baselines = sweep_policies(filters, list(candidates), settings, [BASELINE])
    policies: dict[str, Any] = {}
    for b, recipes in candidates.items():
        policies[f"{BASELINE}@{b}"] = baselines[BASELINE, b]
        for r in recipes:
            try:  # whole layers are paid for at the passkey context, which may not fit where eval_seq_len did
                policies[f"{r.label}@{b}"] = policy_of(r, b, context)
            except ValueError:
                continue
    label = f"{len(trials)} needles in {corpus.spec} (retrieval gate)"
    notify(Progress("recipe", label, 0, len(trials)))
    run = run_passkey(lm.model, trials, policies,
                      progress=lambda done: notify(Progress("recipe", label, done, len(trials))))
    for key, hits in run.hits.items():
        name, _, budget = key.rpartition("@")
        logprob = round(sum(run.logprob[key]) / len(run.logprob[key]), 6)  # rounded: the report JSON stays stable
        if name == BASELINE:
            gate.streamingllm[int(budget)] = sum(hits)
            gate.streamingllm_logprob[int(budget)] = logprob
        else:
            gate.candidates[int(budget)][name] = sum(hits)
            gate.candidate_logprob.setdefault(int(budget), {})[name] = logprob
    return gate


def recall_counts(model: Any) -> tuple[int, ...]:
    """The recall-head counts searched and gated: :data:`RECALL_SHARES` of the compressed KV heads, at least one."""
    from qfilters.architecture import compressed_layers, text_config

    heads = len(compressed_layers(model)) * int(text_config(model).num_key_value_heads)
    return tuple(sorted({max(1, round(share * heads)) for share in RECALL_SHARES}))


def measure_needles(lm: LoadedModel, corpus: Corpus, settings: ValidationSettings,
                    notify: ProgressFn) -> tuple[tuple[float, ...], ...] | None:
    """The needle attention table (:func:`qfilters.recall_heads.needle_attention`, rounded to 9 digits so the stored
    JSON is stable) on :data:`RECALL_TRIALS` passkeys in ``corpus`` (calibration text, seeded apart from the gate's
    trials); None when the text is too short for the passkey contexts (the gate says so itself)."""
    from qfilters.passkey import make_trials
    from qfilters.recall_heads import needle_attention

    text = "\n".join(d.text for d in corpus.documents)
    try:
        trials = make_trials(lm.tokenizer, text, RECALL_TRIALS, settings.resolved_passkey_context(), settings.seed + 1)
    except ValueError:
        return None
    label = f"recall heads: {RECALL_TRIALS} needles in {corpus.spec}"
    notify(Progress("recipe", label, 0, len(trials)))
    table = needle_attention(lm.model, trials, progress=lambda done: notify(Progress("recipe", label, done,
                                                                                      len(trials))))
    return tuple(tuple(round(float(x), 9) for x in row) for row in table)


def measure_spread(lm: LoadedModel, chunks: EvalChunks, filters: Any) -> dict[str, Any]:
    """The spreads of every blendable scorer and of novelty on the first search document (calibration text)."""
    from qfilters.policy_table import build_scorer
    from qfilters.recipes import BLENDABLE, score_spread
    from qfilters.rope import rope_frequencies
    from qfilters.scorers import ContentNoveltyScorer, NoveltyScorer

    scorers = {name: build_scorer(name, ScorerInputs(filters=filters, n_sinks=0)) for name in BLENDABLE}
    scorers["novelty"] = NoveltyScorer(n_sinks=0)
    try:
        scorers["content-novelty"] = ContentNoveltyScorer(n_sinks=0, frequencies=rope_frequencies(lm.model))
    except ValueError:  # no fixed-frequency RoPE: recipes reading content novelty are infeasible (see AXES)
        pass
    return score_spread(lm.model, chunks.ids[0], scorers)


def _table(rows: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(row) for row in rows)


def head_budget(budgets: Sequence[int]) -> int:
    """Where the KV heads' sensitivity is measured: the sweep budget nearest its geometric mean (ties to the smaller),
    so one ranking serves the whole sweep rather than its tightest end (which only ranks the window's neighbours)."""
    middle = math.exp(sum(math.log(b) for b in budgets) / len(budgets))
    return min(sorted(budgets), key=lambda b: abs(math.log(b / middle)) - 1e-12 * (b < middle))


def measure_head_sensitivity(lm: LoadedModel, chunks: EvalChunks, filters: Any, budget: int,
                             settings: ValidationSettings, first_full_nll: float, tick: Any = None
                             ) -> list[list[float]]:
    """[layer][KV head]: the NLL increase per scored token when only that KV head is compressed by Q-Filters at
    ``budget`` (the stock window), on the first search document (calibration text), rounded to 9 digits."""
    from qfilters.recipes import head_sensitivity
    from qfilters.scorers import QFilterScorer

    table = head_sensitivity(lm.model, chunks.ids[0], QFilterScorer(filters), budget, settings.window_for(budget),
                             settings.score_last, on_pass=tick, full_nll=first_full_nll)
    return [[round(x, 9) for x in row] for row in table]


def measure_sensitivity(lm: LoadedModel, chunks: EvalChunks, filters: Any, budget: int,
                        settings: ValidationSettings, first_full_nll: float, tick: Any = None) -> list[float]:
    """Per compressible layer: the NLL increase per scored token when only that layer is compressed by Q-Filters at
    ``budget`` (the stock window), on the first search document: calibration text, like the rest of the search.
    ``first_full_nll`` is that document's full-cache NLL, from the search's own full pass."""
    from qfilters.recipes import layer_sensitivity
    from qfilters.scorers import QFilterScorer

    measured = layer_sensitivity(lm.model, chunks.ids[:1], QFilterScorer(filters), budget, settings.window_for(budget),
                                 settings.score_last, on_pass=tick, full_nll=[first_full_nll])
    return [round(x, 9) for x in measured.nll_increase]


def recipe_report(search: RecipeSearch) -> RecipeReport:
    """The report section of a search: per budget, the chosen recipe and its score beside StreamingLLM's."""
    from qfilters.validation.schema import RecipeChoice, RecipeReport, RetrievalGateReport, rnd

    gate = search.retrieval
    counted = gate if gate is not None and gate.skipped is None else None  # needles, when the gate ran
    chosen = [RecipeChoice(budget=b, recipe=r.to_dict(), description=r.describe() + _span(search.head_budgets.get(b)),
                           search_perplexity=rnd(search.chosen_perplexity[b]),
                           search_streamingllm_perplexity=rnd(search.streamingllm[b]),
                           search_passkey=counted.candidates[b].get(r.label) if counted else None,
                           search_streamingllm_passkey=counted.streamingllm[b] if counted else None,
                           search_passkey_candidates=dict(counted.candidates[b]) if counted else None,
                           search_key_logprob=counted.candidate_logprob[b].get(r.label) if counted else None,
                           search_streamingllm_key_logprob=counted.streamingllm_logprob[b] if counted else None,
                           search_key_logprob_candidates=dict(counted.candidate_logprob[b]) if counted else None,
                           search_passes=search.passes.get(b), search_converged=search.converged.get(b))
              for b, r in sorted(search.book.by_budget.items())]
    return RecipeReport(searched_on=search.book.searched_on, documents=search.documents,
                        search_full_perplexity=rnd(search.full_perplexity), evaluations=len(search.trace),
                        chosen=chosen,
                        recall_heads=_top_recall_heads(search.needle_attention, search.compressed_layers),
                        retrieval_gate=None if gate is None else RetrievalGateReport(
                            filler=gate.filler, trials=gate.trials, context_tokens=gate.context_tokens,
                            skipped=gate.skipped))


def _head_spans(chosen: dict[int, Recipe], policy_of: Any, n_heads: int) -> dict[int, tuple[int, int, int]]:
    """(min, median, max) keys per KV head of each chosen recipe that allocates by KV head: what a reader needs to
    judge a per-head split (how far apart its heads are)."""
    spans = {}
    for b, r in chosen.items():
        if r.allocation == "head":
            per = sorted(x for p in policy_of(r, b).layers.values() if p is not None
                         for x, _ in p.head_limits(n_heads))
            spans[b] = (per[0], per[len(per) // 2], per[-1])
    return spans


def _span(span: tuple[int, int, int] | None) -> str:
    return "" if span is None else f" (KV heads keep {span[0]} to {span[2]} keys, median {span[1]})"


def _top_recall_heads(table: Any, layers: Sequence[int] | None, shown: int = 8) -> list[tuple[int, int, float]] | None:
    """The report's view of the needle attention: its ``shown`` highest heads in the compressed ``layers`` (a
    sliding-window layer is never compressed, so it has no recall head to show)."""
    from qfilters.recall_heads import top_heads

    if table is None:
        return None
    layers = range(len(table)) if layers is None else layers
    heads = top_heads(table, min(shown, sum(len(table[i]) for i in layers)), layers)
    return [(i, h, round(float(table[i][h]), 4)) for i, h in heads]
