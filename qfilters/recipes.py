"""Eviction recipes: per-layer budgets, windows, sinks and scorer at a fixed total KV memory.

A recipe says how a total of ``budget x compressible layers`` stored keys (per KV head) is spent: which scorer ranks
old keys, what share of each layer's budget is a recent window, how many sinks are forced, how the total is split
across layers (``uniform``; ``pyramid``: more to early layers, linearly; ``sensitivity``: half uniform, half in
proportion to each layer's measured perplexity loss when compressed alone; ``head``: the same over every KV head of
the compressed layers, each head measured alone, so heads of one layer keep different numbers of keys), how many
first layers are kept whole (paid for at the sequence length, out of the same total), what share of the last layers
rank old keys by novelty instead (:class:`~qfilters.scorers.NoveltyScorer`: keeps one-off details such as a passkey,
which the filter direction ranks last), how much novelty the other layers add to the scorer
(:class:`~qfilters.scorers.BlendScorer`, on per-head scales measured on calibration text: :func:`score_spread`), and
how fast an old key's score is discounted with its age (:class:`~qfilters.scorers.AgedScorer`: a soft recent window,
on the same scales), and how many recall heads (the KV heads a question reads a detail back through, measured on
calibration text: :mod:`qfilters.recall_heads`) rank old keys by novelty alone.

A recipe at a budget is a :class:`~qfilters.policy.LayerwisePolicy` (one ``EvictionPolicy`` per layer), which the
cache, the one-pass evaluator and passkey retrieval all take: evaluation stays exact, since each layer is still greedy
eviction with static scores (checked against token-by-token decoding in tests/test_recipes_passkey.py and, per head,
tests/test_per_head.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from qfilters.policy import EvictionPolicy, LayerwisePolicy

if TYPE_CHECKING:
    from torch import Tensor

    from qfilters.policy_table import ScorerInputs
    from qfilters.scorers import Scorer

__all__ = ["ALLOCATIONS", "Recipe", "RecipeBook", "allocate", "head_sensitivity", "layer_policies", "layer_roles",
           "layer_sensitivity",
           "score_spread"]

ALLOCATIONS = ("uniform", "pyramid", "sensitivity", "head")
#: scorers a recipe may blend novelty into (static ones a filter set builds alone); their spreads are measured
BLENDABLE = ("qfilters", "knorm")
MAX_NOVELTY_WEIGHT = 100.0
#: scorers whose scores a recipe may discount by age (their spreads are what the discount is counted in)
AGEABLE = (*BLENDABLE, "novelty")
#: what a recipe's novelty reads: the cached keys, or their content with RoPE undone (qfilters.rope)
NOVELTY_SCORERS = ("novelty", "content-novelty")
MAX_RECENCY_WEIGHT = 100.0


def storable_scorers() -> tuple[str, ...]:
    """Scorers a recipe stored in qfilters.json may name: built from the filter tensor alone (no statistics file)."""
    from qfilters.policy_table import POLICY_TABLE

    return tuple(n for n, e in POLICY_TABLE.items() if e.scorer is not None and set(e.needs) <= {"filters"})


@dataclass(frozen=True)
class Recipe:
    """JSON-able description of an eviction recipe (the scorer by name; see :func:`layer_policies`)."""

    scorer: str
    window_share: float = 0.125
    n_sinks: int = 0
    allocation: str = "uniform"
    full_layers: int = 0  # first compressible layers kept whole, paid for out of the total
    novelty_layers: float = 0.0  # share of the (non-whole) compressed layers, counted from the last, ranked by novelty
    novelty_weight: float = 0.0  # the other layers rank by scorer + this x novelty, both in units of their spread
    recency_weight: float = 0.0  # scorer spreads (a blend: its base's) a key loses per layer budget of newer keys
    novelty_scorer: str = "novelty"  # the novelty the blend and the novelty layers read (NOVELTY_SCORERS)
    recall_heads: int = 0  # KV heads reading details most (RecipeBook.needle_attention) ranked by novelty alone

    def __post_init__(self) -> None:
        if not 0.0 <= self.window_share < 1.0:
            raise ValueError(f"window_share must be in [0, 1), got {self.window_share}")
        if not 0.0 <= self.novelty_layers <= 1.0:
            raise ValueError(f"novelty_layers must be in [0, 1], got {self.novelty_layers}")
        if not 0.0 <= self.novelty_weight <= MAX_NOVELTY_WEIGHT:
            raise ValueError(f"novelty_weight must be in [0, {MAX_NOVELTY_WEIGHT:g}], got {self.novelty_weight}")
        if self.novelty_weight and self.scorer not in BLENDABLE:
            raise ValueError(f"novelty_weight blends novelty into {', '.join(BLENDABLE)}, not {self.scorer!r}")
        if not 0.0 <= self.recency_weight <= MAX_RECENCY_WEIGHT:
            raise ValueError(f"recency_weight must be in [0, {MAX_RECENCY_WEIGHT:g}], got {self.recency_weight}")
        if self.recency_weight and self.scorer not in AGEABLE:
            raise ValueError(f"recency_weight discounts the scores of {', '.join(AGEABLE)} by age, not "
                             f"{self.scorer!r}")
        if self.novelty_scorer not in NOVELTY_SCORERS:
            raise ValueError(f"novelty_scorer must be one of {NOVELTY_SCORERS}, got {self.novelty_scorer!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.n_sinks < 0 or self.full_layers < 0 or self.recall_heads < 0:
            raise ValueError("n_sinks, full_layers and recall_heads must be non-negative")
        if self.recall_heads and self.scorer not in BLENDABLE:
            raise ValueError(f"recall heads switch heads of {', '.join(BLENDABLE)} to novelty, not {self.scorer!r}")

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """The recipe of :meth:`to_dict`'s JSON; ValueError naming the field for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}")
        if not isinstance(data.get("scorer"), str):
            raise ValueError("a recipe needs 'scorer', the name of a scorer in the policy table (e.g. 'qfilters')")
        storable = storable_scorers()
        if data["scorer"] not in storable:
            raise ValueError(f"a stored recipe's scorer must be one the filters alone can build "
                             f"({', '.join(storable)}), got {data['scorer']!r}")
        nulls = sorted(k for k, v in data.items() if v is None)
        if nulls:
            raise ValueError(f"recipe field(s) {nulls} are null: leave them out for the defaults")
        for name, kind in (("window_share", (int, float)), ("n_sinks", int), ("full_layers", int),
                           ("allocation", str), ("novelty_layers", (int, float)), ("novelty_weight", (int, float)),
                           ("recency_weight", (int, float)), ("novelty_scorer", str), ("recall_heads", int)):
            value = data.get(name)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ValueError(f"recipe field {name!r} has the wrong type ({type(value).__name__})")
        return cls(**data)

    @property
    def label(self) -> str:
        return (f"{self.scorer} w={self.window_share:g} s={self.n_sinks} {self.allocation}"
                + (f" full={self.full_layers}" if self.full_layers else "")
                + (f" novelty={self.novelty_layers:g}" if self.novelty_layers else "")
                + (f" blend={self.novelty_weight:g}" if self.novelty_weight else "")
                + (f" {self.novelty_scorer}" if self.novelty_scorer != "novelty" and self.reads_novelty else "")
                + (f" age={self.recency_weight:g}" if self.recency_weight else "")
                + (f" recall={self.recall_heads}" if self.recall_heads else ""))

    @property
    def reads_novelty(self) -> bool:
        """Whether some layer's ranking reads the novelty scorer (a blend or novelty layers)."""
        return bool(self.novelty_weight or self.novelty_layers or self.recall_heads)

    def describe(self) -> str:
        """One line a report reader understands."""
        novelty = "content novelty (RoPE undone)" if self.novelty_scorer == "content-novelty" else "novelty"
        scorer = f"{self.scorer} + {self.novelty_weight:g} x {novelty}" if self.novelty_weight else self.scorer
        parts = [f"scorer {scorer}", f"recent window {self.window_share:.0%} of each layer's budget",
                 f"{self.n_sinks} sink tokens" if self.n_sinks else "no sink tokens",
                 {"uniform": "the same budget in every layer", "pyramid": "more budget to early layers",
                  "sensitivity": "budget by measured layer sensitivity",
                  "head": "budget by measured KV-head sensitivity (heads of a layer keep different numbers of keys)",
                  }[self.allocation]]
        if self.full_layers:
            parts.append(f"first {self.full_layers} compressed layer(s) kept whole")
        if self.novelty_layers:
            parts.append(f"the last {self.novelty_layers:.0%} of compressed layers rank old keys by {novelty} (recall)")
        if self.recency_weight:
            parts.append(f"a key's score falls by {self.recency_weight:g} spread(s) per layer budget of newer keys "
                         "(soft recency)")
        if self.recall_heads:
            parts.append(f"the {self.recall_heads} KV head(s) that read a passkey most on calibration text rank old "
                         f"keys by {novelty} alone (recall heads)")
        return ", ".join(parts)

    def spreads_needed(self) -> set[str]:
        """The scorers whose score spreads this recipe reads (a blend's two; the aged layers' rankers)."""
        needed = {self.scorer, self.novelty_scorer} if self.novelty_weight else set()
        if self.recency_weight:
            needed |= {self.scorer} | ({self.novelty_scorer} if self.novelty_layers or self.recall_heads else set())
        return needed

    def to_dict(self) -> dict[str, Any]:
        """Fields at their defaults that older readers do not know are left out (a recipe without novelty stays
        loadable by qfilters versions before it)."""
        out = asdict(self)
        for name in ("novelty_layers", "novelty_weight", "recency_weight", "recall_heads"):
            if not out[name]:
                del out[name]
        if out["novelty_scorer"] == "novelty":
            del out["novelty_scorer"]
        return out


@dataclass(frozen=True)
class RecipeBook:
    """The recipes a search chose, one per searched budget, as stored in an artifact's ``qfilters.json``.

    Any budget can be asked for: it takes the recipe of the nearest searched budget (log scale, ties to the smaller),
    so a filter set searched at 128 and 512 still has a default at 256. ``sensitivity`` (per compressible layer) is
    what the ``sensitivity`` allocation spreads the budget by; ``context_length`` is the sequence length whole layers
    were paid for at during the search (a cache keeping layers whole needs one). ``score_spread`` (scorer name ->
    [layer][KV head] standard deviation of its scores on calibration text) puts a blend's two scores on one scale.
    ``needle_attention`` ([layer][KV head], :func:`qfilters.recall_heads.needle_attention`) ranks the recall heads.
    ``head_sensitivity`` ([layer][KV head], :func:`head_sensitivity`) is what the ``head`` allocation spreads by.
    """

    by_budget: Mapping[int, Recipe]
    sensitivity: tuple[float, ...] | None = None
    context_length: int | None = None
    searched_on: str = ""
    score_spread: Mapping[str, tuple[tuple[float, ...], ...]] | None = None
    needle_attention: tuple[tuple[float, ...], ...] | None = None
    head_sensitivity: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not self.by_budget:
            raise ValueError("a recipe book needs at least one budget")
        for budget, recipe in self.by_budget.items():
            if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
                raise ValueError(f"recipe budgets must be positive integers, got {budget!r}")
            if not isinstance(recipe, Recipe):
                raise ValueError(f"the recipe at budget {budget} is a {type(recipe).__name__}, not a Recipe")
            if recipe.allocation == "sensitivity" and self.sensitivity is None:
                raise ValueError(f"the recipe at budget {budget} allocates by sensitivity but none is stored")
            if recipe.allocation == "head" and self.head_sensitivity is None:
                raise ValueError(f"the recipe at budget {budget} allocates by KV-head sensitivity but none is stored")
            missing = recipe.spreads_needed() - set(self.score_spread or {})
            if missing:
                raise ValueError(f"the recipe at budget {budget} ({recipe.label}) reads score spreads that are not "
                                 f"stored ({', '.join(sorted(missing))})")
            if recipe.recall_heads and self.needle_attention is None:
                raise ValueError(f"the recipe at budget {budget} ({recipe.label}) switches recall heads but no "
                                 "needle attention is stored to rank them")
        table = self.needle_attention
        if table is not None and (not table or any(not row or len(row) != len(table[0]) for row in table) or not all(
                math.isfinite(x) and x >= 0 for row in table for x in row)):
            raise ValueError("needle_attention must be a [layer][KV head] table of finite, non-negative numbers")
        for name, rows in (self.score_spread or {}).items():
            if not rows or any(not row or len(row) != len(rows[0]) for row in rows) or not all(
                    math.isfinite(x) and x >= 0 for row in rows for x in row):
                raise ValueError(f"score spread of {name!r} must be a [layer][KV head] table of finite, "
                                 "non-negative numbers")
        heads = self.head_sensitivity
        if heads is not None and (not heads or any(not row or len(row) != len(heads[0]) for row in heads) or not all(
                math.isfinite(x) for row in heads for x in row)):
            raise ValueError("head_sensitivity must be a [layer][KV head] table of finite numbers")
        if self.sensitivity is not None and not all(math.isfinite(x) for x in self.sensitivity):
            raise ValueError("recipe 'sensitivity' must hold finite numbers")
        if self.context_length is not None and self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")

    @property
    def needs_format_2(self) -> bool:
        """Whether a recipe ranks any layer by novelty, discounts by age or splits budgets per KV head (artifact
        format 2: older readers do not know them)."""
        return any(r.novelty_layers or r.novelty_weight or r.recency_weight or r.recall_heads or r.scorer == "novelty"
                   or r.allocation == "head" for r in self.by_budget.values())

    def recipe_for(self, budget: int) -> Recipe:
        """The recipe of the searched budget nearest to ``budget`` (log scale; ties go to the smaller budget)."""
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        return self.by_budget[self.nearest_budget(budget)]

    def nearest_budget(self, budget: int) -> int:
        """The searched budget with the smallest ratio to ``budget`` (exact: ties go to the smaller budget)."""
        return min(self.by_budget, key=lambda b: (Fraction(max(b, budget), min(b, budget)), b))

    def policy(self, budget: int, model_or_config: Any, inputs: ScorerInputs,
               context_length: int | None = None) -> LayerwisePolicy:
        """The per-layer policy at ``budget`` for this model, with scorers built from ``inputs`` (the filters...)."""
        from qfilters.architecture import compressed_layers
        from qfilters.errors import ShapeMismatchError
        from qfilters.policy_table import build_scorer

        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"budget must be an int, got {type(budget).__name__}")
        searched = self.nearest_budget(budget)
        recipe = self.by_budget[searched]
        seq_len = context_length or self.context_length
        if recipe.full_layers and seq_len is None:
            raise ValueError(f"the recipe at budget {budget} keeps {recipe.full_layers} layer(s) whole, paid for at "
                             "a context length: pass context_length (the number of tokens you expect)")
        layers = compressed_layers(model_or_config)
        if recipe.full_layers >= len(layers):
            raise ValueError(f"the recipe keeps {recipe.full_layers} layers whole but this model compresses only "
                             f"{len(layers)}: it was not searched for this model")
        if recipe.reads_novelty and recipe.novelty_scorer == "content-novelty" and inputs.rope is None:
            from qfilters.rope import rope_frequencies

            inputs = replace(inputs, rope=rope_frequencies(model_or_config))
        scorer = build_scorer(recipe.scorer, replace(inputs, n_sinks=recipe.n_sinks))
        if recipe.novelty_weight or recipe.recall_heads:
            scorer = self.blend(recipe, scorer, inputs.rope, self.recall_mask(recipe, layers))
        novelty = build_scorer(recipe.novelty_scorer, inputs) if recipe.novelty_layers else None
        try:
            return layer_policies(recipe, scorer, budget, layers, seq_len or budget, self.sensitivity, novelty,
                                  self.score_spread, self.head_sensitivity)
        except ShapeMismatchError:  # stored tables for another model: no budget would fit
            raise
        except ValueError as e:
            raise ValueError(f"the recipe searched at budget {searched} ({recipe.label}) does not fit budget "
                             f"{budget}: {e}; pass recipe=None for the stock policy") from e

    def recall_mask(self, recipe: Recipe, layers: Sequence[int]) -> Tensor | None:
        """[layer, KV head] bool: the recipe's recall heads, the highest in :attr:`needle_attention` among the
        layers that rank by the scorer (compressed, not kept whole, not novelty layers); None when it has none."""
        import torch

        from qfilters.errors import ShapeMismatchError
        from qfilters.recall_heads import top_heads

        if not recipe.recall_heads:
            return None
        table = self.needle_attention
        if table is None:  # __post_init__ refuses such a book; a guard for mypy
            raise ValueError("recall heads need the book's needle attention")
        _, ranked, _ = layer_roles(recipe, layers)
        if any(i >= len(table) for i in ranked):
            raise ShapeMismatchError(f"the stored needle attention covers {len(table)} layers, not the compressed "
                                     f"layers {ranked}: was it measured on this model?")
        mask = torch.zeros(len(table), len(table[0]), dtype=torch.bool)
        for i, h in top_heads(table, min(recipe.recall_heads, len(ranked) * len(table[0])), ranked):
            mask[i, h] = True
        return mask

    def blend(self, recipe: Recipe, scorer: Scorer, rope: Any = None, solo: Tensor | None = None) -> Scorer:
        """``scorer`` plus ``recipe.novelty_weight`` x novelty, each in units of its stored spread per (layer, head)
        (``rope``: the model's rotary frequencies, read when the recipe's novelty is content novelty), with the
        ``solo`` heads ([layer, KV head] bool, the recall heads) ranked by novelty alone."""
        import torch

        from qfilters.scorers import BlendScorer

        name = recipe.novelty_scorer
        if name == "content-novelty" and rope is None:
            raise ValueError("blending content novelty needs the model's rotary frequencies (qfilters.rope)")
        frequencies = rope if name == "content-novelty" else None
        if not recipe.novelty_weight:  # recall heads alone: the other heads keep the scorer's scores exactly
            if solo is None:
                raise ValueError("a blend needs a novelty weight or recall heads")
            return BlendScorer(base=scorer, weights=torch.zeros(solo.shape), frequencies=frequencies, solo=solo)
        spread = self.score_spread or {}
        if not {recipe.scorer, name} <= set(spread):
            raise ValueError(f"blending {name} into {recipe.scorer} needs both score spreads; this book has "
                             f"{sorted(spread) or 'none'}")
        base = torch.tensor(spread[recipe.scorer], dtype=torch.float64)
        novelty = torch.tensor(spread[name], dtype=torch.float64)
        if base.shape != novelty.shape:
            raise ValueError(f"score spreads of {recipe.scorer} {tuple(base.shape)} and novelty "
                             f"{tuple(novelty.shape)} differ in shape")
        ratio = torch.where(novelty > 0, base / novelty.clamp_min(1e-30), torch.zeros_like(base))
        if solo is not None and tuple(solo.shape) != tuple(ratio.shape):
            raise ValueError(f"recall heads {tuple(solo.shape)} and score spreads {tuple(ratio.shape)} differ in shape")
        return BlendScorer(base=scorer, weights=(recipe.novelty_weight * ratio).float(), frequencies=frequencies,
                           solo=solo)

    def policies(self, budgets: Sequence[int], model_or_config: Any, inputs: ScorerInputs,
                 context_length: int | None = None) -> dict[int, LayerwisePolicy]:
        """:meth:`policy` at each of ``budgets`` (what the evaluator, the validator and passkey compare)."""
        return {b: self.policy(b, model_or_config, inputs, context_length) for b in budgets}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"by_budget": {str(b): r.to_dict() for b, r in sorted(self.by_budget.items())},
                               "sensitivity": None if self.sensitivity is None else list(self.sensitivity),
                               "context_length": self.context_length, "searched_on": self.searched_on}
        if self.score_spread is not None:  # only books that blend carry it (and are format 2)
            out["score_spread"] = {k: [list(row) for row in v] for k, v in sorted(self.score_spread.items())}
        if self.needle_attention is not None:  # only books with recall heads carry it
            out["needle_attention"] = [list(row) for row in self.needle_attention]
        if self.head_sensitivity is not None:  # only books with per-head budgets carry it
            out["head_sensitivity"] = [list(row) for row in self.head_sensitivity]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> RecipeBook:
        """The book of :meth:`to_dict`'s JSON; ValueError saying what is wrong for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("by_budget"), dict):
            raise ValueError("a recipe book must be a JSON object with 'by_budget': {budget: recipe}")
        by_budget: dict[int, Recipe] = {}
        for key, value in data["by_budget"].items():
            if not (isinstance(key, str) and key.isdigit() and key == str(int(key))):
                raise ValueError(f"recipe budget {key!r} is not a positive integer")
            by_budget[int(key)] = Recipe.from_dict(value)
        sensitivity = data.get("sensitivity")
        if sensitivity is not None and not (isinstance(sensitivity, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in sensitivity)):
            raise ValueError("recipe 'sensitivity' must be a list of numbers")
        context_length = data.get("context_length")
        if context_length is not None and (not isinstance(context_length, int) or isinstance(context_length, bool)):
            raise ValueError("recipe 'context_length' must be an integer")
        spread = data.get("score_spread")
        if spread is not None and not (isinstance(spread, dict) and all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(row, list) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in row) for row in v)
                for k, v in spread.items())):
            raise ValueError("recipe 'score_spread' must map scorer names to [layer][KV head] lists of numbers")
        tables = {}
        for name in ("needle_attention", "head_sensitivity"):
            rows = data.get(name)
            if rows is not None and not (isinstance(rows, list) and all(isinstance(row, list) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in row) for row in rows)):
                raise ValueError(f"recipe {name!r} must be a [layer][KV head] list of numbers")
            tables[name] = None if rows is None else tuple(tuple(float(x) for x in row) for row in rows)
        return cls(by_budget, None if sensitivity is None else tuple(float(x) for x in sensitivity),
                   context_length, str(data.get("searched_on") or ""),
                   None if spread is None else {k: tuple(tuple(float(x) for x in row) for row in v)
                                                for k, v in spread.items()},
                   tables["needle_attention"], tables["head_sensitivity"])


def _round_to_total(weights: Sequence[float], total: int, minimum: int) -> list[int]:
    """Integers >= minimum, proportional to ``weights``, summing to ``total`` (largest remainder, earlier wins ties)."""
    n = len(weights)
    spare = total - minimum * n
    if spare < 0:
        raise ValueError(f"a total of {total} keys cannot give {n} layers (or KV heads) at least {minimum} each")
    w_sum = sum(weights)
    raw = [spare * w / w_sum for w in weights]
    base = [math.floor(x) for x in raw]
    left = spare - sum(base)
    order = sorted(range(n), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return [minimum + b for b in base]


def allocate(allocation: str, budget: int, n_layers: int, minimum: int,
             sensitivity: Sequence[float] | None = None, total: int | None = None) -> list[int]:
    """Per-layer budgets summing to ``total`` (default ``budget * n_layers``), each at least ``minimum``."""
    total = budget * n_layers if total is None else total
    if allocation == "uniform":
        weights = [1.0] * n_layers
    elif allocation == "pyramid":  # 1.5x the mean at the first layer down to 0.5x at the last
        weights = [1.5 - (i / max(1, n_layers - 1)) for i in range(n_layers)]
    elif allocation == "sensitivity":
        if sensitivity is None or len(sensitivity) != n_layers:
            raise ValueError(f"the sensitivity allocation needs one sensitivity per compressed layer ({n_layers})")
        s = [max(float(x), 0.0) for x in sensitivity]
        s_sum = sum(s) or 1.0
        weights = [0.5 / n_layers + 0.5 * x / s_sum for x in s]
    else:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    return _round_to_total(weights, total, minimum)


def layer_roles(recipe: Recipe, compress_layers: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """``recipe``'s split of ``compress_layers``: (kept whole, ranked by its scorer, ranked by novelty). The first
    layers stay whole and the last ``novelty_layers`` share of the others rank by novelty; the recall heads and the
    per-layer policies both read this one split, so they cannot disagree on which layer does what."""
    layers = list(compress_layers)
    whole, rest = layers[: recipe.full_layers], layers[recipe.full_layers:]
    n_novel = round(recipe.novelty_layers * len(rest))
    return whole, rest[: len(rest) - n_novel], rest[len(rest) - n_novel:]


def layer_policies(recipe: Recipe, scorer: Scorer, budget: int, compress_layers: Sequence[int], seq_len: int,
                   sensitivity: Sequence[float] | None = None, novelty: Scorer | None = None,
                   score_spread: Mapping[str, Sequence[Sequence[float]]] | None = None,
                   head_sensitivity: Sequence[Sequence[float]] | None = None) -> LayerwisePolicy:
    """The per-layer policy of ``recipe`` at a mean ``budget`` over ``compress_layers`` (first ones kept whole).

    Total memory is ``budget * len(compress_layers)`` keys per KV head; a layer kept whole costs ``seq_len``.
    ``sensitivity`` is per entry of ``compress_layers`` (only the ``sensitivity`` allocation reads it); ``novelty``
    ranks the last ``recipe.novelty_layers`` share of the compressed layers (needed when that share is not 0);
    ``score_spread`` ([layer][KV head] per scorer name) is the unit of an age discount (``recipe.recency_weight``);
    ``head_sensitivity`` ([layer][KV head]) is what the ``head`` allocation splits the total over all KV heads by.
    """
    whole, ranked, novel_layers = layer_roles(recipe, compress_layers)
    rest = ranked + novel_layers
    total = budget * (len(whole) + len(rest)) - seq_len * len(whole)
    # a ranker that forces sinks of its own (novelty, a blend: the first key is its own running sum, the lowest
    # score) keeps them whatever the recipe's, so its layers pay for them
    def sinks_of(ranker: Scorer | None) -> int:
        return max(recipe.n_sinks, getattr(ranker, "n_sinks", 0))

    novelty_sinks, scorer_sinks = sinks_of(novelty), sinks_of(scorer)
    minimum = max(novelty_sinks if recipe.novelty_layers else 0, scorer_sinks) + 2
    if total < minimum * len(rest):
        raise ValueError(f"keeping {len(whole)} layers whole at {seq_len} tokens leaves {total} keys for "
                         f"{len(rest)} layers at budget {budget}: fewer first layers or a larger budget")
    sens = None if sensitivity is None else list(sensitivity)[recipe.full_layers:]
    budgets: list[int | list[int]]
    if recipe.allocation == "head":
        budgets = list(allocate_heads(head_sensitivity, rest, total, minimum))
    else:
        budgets = list(allocate(recipe.allocation, budget, len(rest), minimum, sens, total))
    if novel_layers and novelty is None:
        raise ValueError("this recipe ranks some layers by novelty: pass the novelty scorer")
    novel = recipe.novelty_scorer
    roles = [recipe.scorer] * len(ranked) + [novel] * len(novel_layers)
    rankers: dict[str, Scorer | None] = {recipe.scorer: scorer}
    if novelty is not None:  # (a novelty-ranked recipe without novelty layers keeps its scorer)
        rankers[novel] = novelty
    if recipe.recency_weight:
        rankers = _aged(recipe, rankers, dict(zip(rest, budgets, strict=True)), dict(zip(rest, roles, strict=True)),
                        score_spread)
    out: dict[int, EvictionPolicy | None] = {i: None for i in whole}
    for i, b, role in zip(rest, budgets, roles, strict=True):
        ranker = rankers[role]
        sinks = novelty_sinks if role == novel and novelty is not None else scorer_sinks
        assert ranker is not None, role  # a role always has its ranker
        if isinstance(b, list):  # per KV head: each head keeps the window share of its own budget
            windows = [min(x - sinks - 1, round(recipe.window_share * x)) for x in b]
            out[i] = EvictionPolicy.per_head(ranker, b, windows, sinks)
        else:
            out[i] = EvictionPolicy(ranker, b, min(b - sinks - 1, round(recipe.window_share * b)), sinks)
    return LayerwisePolicy(out)


def allocate_heads(head_sensitivity: Sequence[Sequence[float]] | None, layers: Sequence[int], total: int,
                   minimum: int) -> list[list[int]]:
    """Per layer of ``layers``, per KV head: budgets summing to ``total`` x the number of KV heads (the memory of
    ``total`` keys per head index), each at least ``minimum``; half spread uniformly, half in proportion to each
    head's measured sensitivity (negative counts as 0). The uniform half is the floor that keeps every head useful."""
    from qfilters.errors import ShapeMismatchError

    if head_sensitivity is None:
        raise ValueError("the head allocation needs the KV heads' measured sensitivity")
    table = [list(row) for row in head_sensitivity]
    if any(i >= len(table) for i in layers):
        raise ShapeMismatchError(f"the stored head sensitivity covers {len(table)} layers, not the compressed layers "
                                 f"{list(layers)}: was it measured on this model?")
    n_heads = len(table[0])
    s = [max(float(x), 0.0) for i in layers for x in table[i]]
    n, s_sum = len(s), sum(s) or 1.0
    flat = _round_to_total([0.5 / n + 0.5 * x / s_sum for x in s], total * n_heads, minimum)
    return [flat[k * n_heads:(k + 1) * n_heads] for k in range(len(layers))]


def _aged(recipe: Recipe, rankers: Mapping[str, Scorer | None], budgets: Mapping[int, int | list[int]],
          roles: Mapping[int, str],
          score_spread: Mapping[str, Sequence[Sequence[float]]] | None) -> dict[str, Scorer | None]:
    """Each ranker with the recipe's age discount: at layer l, ``recency_weight * spread[l] / budget[l]`` per token."""
    import torch

    from qfilters.errors import ShapeMismatchError
    from qfilters.scorers import AgedScorer

    spread = score_spread or {}
    missing = recipe.spreads_needed() - set(spread)
    if missing:
        raise ValueError(f"an age discount is counted in score spreads; those of {', '.join(sorted(missing))} are "
                         "not given")
    out = dict(rankers)
    for role in sorted(set(roles.values())):  # the rankers some layer uses
        ranker = rankers[role]
        assert ranker is not None, role
        table = torch.tensor(spread[role], dtype=torch.float64) if role in spread else None
        if table is None or table.dim() != 2 or any(i >= table.shape[0] for i in budgets):
            raise ShapeMismatchError(f"the score spread of {role!r} does not cover the compressed layers "
                             f"{sorted(budgets)}: was it measured on this model?")
        rates = torch.zeros_like(table)
        solo = getattr(ranker, "solo", None)  # recall heads rank by novelty alone: discounted in its spread
        novelty = torch.tensor(spread[recipe.novelty_scorer], dtype=torch.float64) if solo is not None else None
        for i, layer_budget in budgets.items():
            b = torch.as_tensor(layer_budget, dtype=torch.float64)  # per KV head under the head allocation
            if roles[i] == role:
                rates[i] = recipe.recency_weight * table[i] / b
                if solo is not None and novelty is not None:
                    rates[i] = torch.where(solo[i], recipe.recency_weight * novelty[i] / b, rates[i])
        out[role] = AgedScorer(ranker, rates.float())
    return out


@dataclass
class Sensitivity:
    """Per compressible layer: mean NLL increase per token when only that layer is compressed."""

    layers: list[int]
    nll_increase: list[float] = field(default_factory=list)


def layer_sensitivity(model: Any, chunks: Sequence[Tensor], scorer: Scorer, budget: int, window: int,
                      score_last: int, on_pass: Callable[[], None] | None = None,
                      full_nll: Sequence[float] | None = None) -> Sensitivity:
    """Compress one layer at a time (``budget``/``window``); NLL increase per token on ``chunks`` (calibration text).

    ``full_nll`` is the baseline of a full-cache pass already made on the same chunks (per chunk NLL sums, as
    :func:`qfilters.evaluate.evaluate_chunks` takes it); one full pass is made anyway, to record the layers each
    compressed pass replays (:mod:`qfilters.replay`). ``on_pass`` is called after each layer's passes over all chunks.
    """
    from qfilters.architecture import compressed_layers

    layers = compressed_layers(model)
    replays, full_passes = zip(*(_recorded(model, c, score_last) for c in chunks), strict=True)
    full = sum(full_passes) if full_nll is None else sum(full_nll)
    out = Sensitivity(layers)
    n_tok = score_last * sum(c.shape[0] for c in chunks)
    for i in layers:
        alone = LayerwisePolicy({i: EvictionPolicy(scorer, budget, window)})
        nll = sum(_replayed(model, c, alone, score_last, r, i) for c, r in zip(chunks, replays, strict=True))
        out.nll_increase.append((nll - full) / n_tok)
        if on_pass is not None:
            on_pass()
    return out


def _recorded(model: Any, chunk: Tensor, score_last: int) -> tuple[Any, float]:
    """The full-cache NLL sum of ``chunk``, with its decoder layers' outputs recorded to replay (None where the
    model's layers cannot be replayed)."""
    from qfilters.onepass import perplexity
    from qfilters.replay import LayerReplay, replayable

    if not replayable(model):  # whole passes, then
        return None, perplexity(model, chunk, None, score_last).nll_sum
    replay = LayerReplay(model)
    with replay.recording(chunk):
        nll = perplexity(model, chunk, None, score_last).nll_sum
    return replay, nll


def _replayed(model: Any, chunk: Tensor, policy: LayerwisePolicy, score_last: int, replay: Any, start: int
              ) -> float:
    """The NLL sum under ``policy``, which leaves layers before ``start`` as the full cache has them."""
    from qfilters.onepass import perplexity

    if replay is None:
        return perplexity(model, chunk, policy, score_last).nll_sum
    with replay.starting_at(start, chunk):
        return perplexity(model, chunk, policy, score_last).nll_sum


def head_sensitivity(model: Any, chunk: Tensor, scorer: Scorer, budget: int, window: int, score_last: int,
                     on_pass: Callable[[], None] | None = None, full_nll: float | None = None
                     ) -> list[list[float]]:
    """[layer][KV head]: the NLL increase per scored token when only that KV head is compressed (``budget``/
    ``window``; every other head keeps all its keys), on ``chunk`` [B, T] (calibration text). Layers not compressed
    get 0. One forward pass per compressed KV head, each starting at its layer (:mod:`qfilters.replay`); ``on_pass``
    is called after each."""
    from qfilters.architecture import compressed_layers, model_dims

    n_layers, n_heads, _ = model_dims(model)
    length = chunk.shape[-1]
    replay, full_pass = _recorded(model, chunk, score_last)
    full = full_pass if full_nll is None else full_nll
    out = [[0.0] * n_heads for _ in range(n_layers)]
    n_tok = score_last * chunk.shape[0]
    for i in compressed_layers(model):
        for h in range(n_heads):  # the others' budget is the whole sequence: they never evict
            alone = EvictionPolicy.per_head(scorer, [budget if g == h else length for g in range(n_heads)],
                                            [window] * n_heads)
            nll = _replayed(model, chunk, LayerwisePolicy({i: alone}), score_last, replay, i)
            out[i][h] = (nll - full) / n_tok
            if on_pass is not None:
                on_pass()
    return out


def score_spread(model: Any, input_ids: Tensor, scorers: Mapping[str, Scorer], skip_first: int = 4
                 ) -> dict[str, tuple[tuple[float, ...], ...]]:
    """Per scorer, the standard deviation of its scores over the keys of ``input_ids`` (full cache; calibration
    text), per [layer][KV head]: the scale a blend divides each score by. The first ``skip_first`` positions (sinks,
    where novelty is extreme by construction) are left out. Rounded to 9 digits, so the stored JSON is stable."""
    import torch

    from qfilters.attention import attention_hook

    found: dict[str, dict[int, list[float]]] = {name: {} for name in scorers}

    def hook(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, base_fn: Any,
             **kwargs: Any) -> Any:
        positions = torch.arange(key.shape[2], device=key.device)
        for name, scorer in scorers.items():
            scores = scorer.score(key, module.layer_idx, positions)[..., skip_first:].double()  # [B, H, T']
            spread = scores.transpose(0, 1).reshape(scores.shape[1], -1).std(dim=-1)  # [H]
            found[name][module.layer_idx] = [round(float(x), 9) for x in spread]
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] <= skip_first + 1:
        raise ValueError(f"score spreads need more than {skip_first + 1} tokens, got {input_ids.shape[1]}")
    with torch.inference_mode(), attention_hook(model, hook):
        model(input_ids.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    return {name: tuple(tuple(per_layer[i]) for i in sorted(per_layer)) for name, per_layer in found.items()}
