"""The one table of eviction methods: name, label, colour, order and scorer of each.

Everything that lists methods derives from this table: the scorer factory (``make_scorer``), ``qfilters eval``'s and
the validator's default comparison, the report schema's allowed names, the Markdown/HTML reports and the figures.
Adding a method is one :class:`~qfilters.scorers.Scorer` subclass plus one row (here, or at run time with
:func:`register_policy`).

Torch-free on import (scorers are named ``"module:Class"`` and imported on first use): the report schema and a
service's API process read the table without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qfilters.scorers import Scorer

__all__ = ["FULL", "POLICY_TABLE", "PolicyEntry", "ScorerInputs", "build_scorer", "compared_policies",
           "policy_entry", "policy_label", "policy_order", "register_policy", "unregister_policy"]

FULL = "full"  # the full cache: the reference of every gap, no scorer
RECIPE = "recipe"  # a filter set's per-layer eviction recipe (qfilters.recipes.RecipeBook), not one scorer


@dataclass(frozen=True)
class ScorerInputs:
    """What a scorer may be built from; each row says which of these it needs."""

    filters: Any = None  # Q-Filters: a [L, H_kv, D] tensor or a QFilters
    query_stats: Any = None  # calibration query moments (qfilters.moments.QueryMoments)
    n_sinks: int = 4  # StreamingLLM's attention sinks
    seed: int = 0  # the random baseline's seed
    rope: Any = None  # the model's rotary frequencies per layer (qfilters.rope.rope_frequencies): content novelty


_NEEDS = {"filters": "filters (a [L, H_kv, D] tensor or a QFilters)",
          "query_stats": "query statistics (calibrate with --query-stats)",
          "rope": "the model's rotary frequencies (ScorerInputs(rope=qfilters.rope.rope_frequencies(model)))"}


@dataclass(frozen=True)
class PolicyEntry:
    """One eviction method. ``scorer`` is a Scorer class or ``"module:Class"``; None for the full cache and for
    references that are not static scorers (they need attention weights). ``compared``: part of the default
    comparison of ``qfilters eval`` and the validator."""

    name: str
    label: str
    color: str
    scorer: str | type | None
    compared: bool = False
    needs: tuple[str, ...] = ()

    def scorer_class(self) -> type[Scorer]:
        if self.scorer is None:
            raise ValueError(f"{self.name!r} ({self.label}) is not a static scorer")
        if isinstance(self.scorer, str):
            module, _, attr = self.scorer.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.scorer

    def build(self, inputs: ScorerInputs) -> Scorer:
        """The scorer of this method, built from ``inputs`` (ValueError naming what is missing)."""
        for need in self.needs:
            if getattr(inputs, need, None) is None:
                raise ValueError(f"the {self.name!r} scorer needs {_NEEDS.get(need, need)}")
        return self.scorer_class().from_inputs(inputs)


POLICY_TABLE: dict[str, PolicyEntry] = {e.name: e for e in (
    PolicyEntry(FULL, "Full cache", "#000000", None),
    PolicyEntry("qfilters", "Q-Filters", "#d62728", "qfilters.scorers:QFilterScorer", compared=True,
                needs=("filters",)),
    PolicyEntry("knorm", "K-norm", "#1f77b4", "qfilters.scorers:KNormScorer", compared=True),
    PolicyEntry("streamingllm", "StreamingLLM", "#2ca02c", "qfilters.scorers:StreamingLLMScorer", compared=True),
    PolicyEntry("random", "Random", "#7f7f7f", "qfilters.scorers:RandomScorer"),
    PolicyEntry("meanq", "Mean query", "#9467bd", "qfilters.moment_scorers:MeanQueryScorer",
                needs=("query_stats",)),
    PolicyEntry("gaussian", "Expected attention (Gaussian)", "#ff7f0e", "qfilters.moment_scorers:GaussianScorer",
                needs=("query_stats",)),
    PolicyEntry("novelty", "Novelty (running key mean)", "#bcbd22", "qfilters.scorers:NoveltyScorer"),
    PolicyEntry("content-novelty", "Content novelty (RoPE undone)", "#17becf", "qfilters.scorers:ContentNoveltyScorer",
                needs=("rope",)),
    PolicyEntry("snapkv", "SnapKV-like (needs attention weights)", "#8c564b", None),
    # a per-layer recipe (qfilters.recipes), not one scorer: the validator's searched recipe, shipped with the filters
    PolicyEntry(RECIPE, "Searched recipe", "#e377c2", None),
)}


def register_policy(entry: PolicyEntry) -> PolicyEntry:
    """Add a method at run time (a plugin, a test); names are unique."""
    if entry.name in POLICY_TABLE:
        raise ValueError(f"policy {entry.name!r} is already registered")
    POLICY_TABLE[entry.name] = entry
    return entry


def unregister_policy(name: str) -> None:
    POLICY_TABLE.pop(name, None)


def policy_entry(name: str) -> PolicyEntry:
    entry = POLICY_TABLE.get(name)
    if entry is None:
        raise ValueError(f"unknown policy {name!r}; choose among {list(POLICY_TABLE)}")
    return entry


def build_scorer(name: str, inputs: ScorerInputs = ScorerInputs()) -> Scorer:
    """The scorer of the method ``name`` (ValueError for unknown names and for methods without one)."""
    entry = POLICY_TABLE.get(name)
    if entry is None:
        scorers = [n for n, e in POLICY_TABLE.items() if e.scorer is not None]
        raise ValueError(f"unknown scorer {name!r}; choose one of {scorers}")
    return entry.build(inputs)


def compared_policies() -> tuple[str, ...]:
    """The default comparison, in table order (``qfilters``, ``knorm``, ``streamingllm`` plus registered ones)."""
    return tuple(n for n, e in POLICY_TABLE.items() if e.compared)


def policy_label(name: str) -> str:
    entry = POLICY_TABLE.get(name)
    return entry.label if entry is not None else name


def policy_color(name: str) -> str | None:
    entry = POLICY_TABLE.get(name)
    return entry.color if entry is not None else None


def policy_order(names: Any) -> list[str]:
    """Distinct ``names`` in table order, unknown ones after, sorted."""
    present = list(dict.fromkeys(names))
    known = [p for p in POLICY_TABLE if p in present]
    return known + sorted(p for p in present if p not in POLICY_TABLE)
