"""Age discount (a soft recent window): a recipe's scorer minus w spreads per layer budget of a key's age. It must
stay static per key (the one-pass evaluator equals decoding), travel in qfilters.json with the spreads it is counted
in, and be refused with the reason when anything it needs is missing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qfilters.artifact import QFilters
from qfilters.cache import QFiltersCache
from qfilters.errors import ArtifactError, ShapeMismatchError
from qfilters.evaluate import perplexity, perplexity_reference
from qfilters.policy import EvictionPolicy
from qfilters.recipes import Recipe, RecipeBook
from qfilters.scorers import AgedScorer, BlendScorer, NoveltyScorer, QFilterScorer
from tests.test_blend import _filters, _keys, _spread  # the same random keys, filters and spreads as the blend's


def test_the_discount_grows_with_age_between_the_filter_and_streamingllm() -> None:
    keys, positions = _keys(), torch.arange(40)
    base = QFilterScorer(_filters())
    rates = torch.tensor([[0.0, 0.1, 1e4], [0.0, 0.0, 0.0]])
    aged = AgedScorer(base, rates).score(keys, 0, positions)
    plain = base.score(keys, 0, positions)
    assert torch.allclose(aged, plain + rates[0][None, :, None] * positions.float(), atol=1e-5)
    # rate 0 ranks like the filter; a heavy rate like StreamingLLM (newest first)
    assert torch.equal(aged[:, 0].argsort(), plain[:, 0].argsort())
    assert torch.equal(aged[:, 2].argsort(), positions.expand(2, -1).argsort())
    # two keys with the same filter score: the newer one is kept
    same = keys[:, :, :1].expand(-1, -1, 2, -1)
    pair = AgedScorer(base, rates).score(same, 0, torch.tensor([5, 9]))
    assert (pair[:, 1, 1] > pair[:, 1, 0]).all()


def test_the_discount_keeps_the_inner_sinks_and_stream_state() -> None:
    keys = _keys(50)
    blend = BlendScorer(base=QFilterScorer(_filters()), weights=torch.full((2, 3), 0.7))
    aged = AgedScorer(blend, torch.full((2, 3), 0.05))
    assert aged.n_sinks == blend.n_sinks == 4
    whole = aged.score(keys, 1, torch.arange(50))
    assert torch.isinf(whole[..., :4]).all()
    pieces, state = [], None
    for a, b in ((0, 3), (3, 20), (20, 21), (21, 50)):
        part, state = aged.score_stream(keys[:, :, a:b], 1, torch.arange(a, b), state)
        pieces.append(part)
    assert torch.equal(torch.cat(pieces, dim=-1), whole)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"inner": None, "rates": torch.ones(2, 3)}, TypeError, "Scorer"),
    ({"inner": NoveltyScorer(), "rates": torch.ones(3)}, ShapeMismatchError, "num_layers"),
    ({"inner": NoveltyScorer(), "rates": torch.tensor([[1.0, float("inf")]])}, ValueError, "finite"),
    ({"inner": NoveltyScorer(), "rates": -torch.ones(2, 3)}, ValueError, "non-negative"),
])
def test_a_malformed_discount_is_refused(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        AgedScorer(**kwargs)


def test_one_pass_evaluation_is_exact_against_the_cache(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    blend = BlendScorer(base=QFilterScorer(_filters((n_layers, n_heads, dim)).double()),
                        weights=torch.full((n_layers, n_heads), 1.0))
    aged = AgedScorer(blend, torch.full((n_layers, n_heads), 0.2))
    ids = torch.randint(4, 90, (2, 64), generator=torch.Generator().manual_seed(1))
    policy = EvictionPolicy(aged, 20, 4, n_sinks=4)
    fast, slow = perplexity(model, ids, policy), perplexity_reference(model, ids, policy)
    assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9
    # and the discount changes what is kept (else this test could not fail)
    plain = perplexity(model, ids, EvictionPolicy(blend, 20, 4, n_sinks=4))
    assert plain.nll_sum != fast.nll_sum


def test_an_aged_recipe_travels_with_its_spreads_and_the_cache_uses_them(tiny_llama, tmp_path) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    recipe = Recipe("qfilters", 0.25, 0, "pyramid", recency_weight=0.5)
    book = RecipeBook({32: recipe}, score_spread={"qfilters": _spread(n_layers, n_heads)["qfilters"]})
    path = QFilters(_filters((n_layers, n_heads, dim))).with_recipe(book).save_pretrained(tmp_path / "f")
    meta = json.loads((path / "qfilters.json").read_text())
    assert meta["format_version"] == 2  # format-1 readers say "upgrade", not "malformed"
    assert meta["recipe"]["by_budget"]["32"]["recency_weight"] == 0.5
    loaded = QFilters.from_pretrained(path)
    assert loaded.recipe == book
    policies = {i: layer.policy for i, layer in enumerate(QFiltersCache(tiny_llama.model, loaded, budget=32).layers)
                if getattr(layer, "policy", None) is not None}
    assert policies and all(isinstance(p.scorer, AgedScorer) for p in policies.values())
    # per layer: recency_weight x spread / that layer's budget (pyramid: budgets differ), one spread per budget of age
    for i, p in policies.items():
        expected = torch.tensor([0.5 * (2.0 + i + h) / p.budget for h in range(n_heads)])
        assert torch.allclose(p.scorer.rates[i], expected)
    assert len({p.budget for p in policies.values()}) > 1
    assert "soft recency" in recipe.describe() and "age=0.5" in recipe.label
    assert "recency_weight" not in Recipe("qfilters").to_dict()  # the default stays out: older readers


def test_a_recipe_given_to_the_cache_reads_the_stored_spreads(tiny_llama) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    stored = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform")}, score_spread=_spread(n_layers, n_heads))
    filters = QFilters(_filters((n_layers, n_heads, dim))).with_recipe(stored)
    given = Recipe("qfilters", 0.5, 0, "uniform", recency_weight=0.25)
    cache = QFiltersCache(tiny_llama.model, filters, budget=32, recipe=given)
    policies = {i: layer.policy for i, layer in enumerate(cache.layers) if getattr(layer, "policy", None) is not None}
    assert policies and all(isinstance(p.scorer, AgedScorer) and p.window == 16 for p in policies.values())
    i = min(policies)
    expected = torch.tensor([0.25 * (2.0 + i + h) / 32 for h in range(n_heads)])
    assert torch.allclose(policies[i].scorer.rates[i], expected)
    bare = QFilters(_filters((n_layers, n_heads, dim)))  # no stored spreads: the reason, not a crash
    with pytest.raises(ValueError, match=r"spreads that are not stored \(qfilters\)"):
        QFiltersCache(tiny_llama.model, bare, budget=32, recipe=given)


def test_novelty_layers_are_discounted_in_novelty_spreads(tiny_llama) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    recipe = Recipe("qfilters", 0.25, 0, "uniform", novelty_layers=0.5, recency_weight=0.25)
    with pytest.raises(ValueError, match=r"spreads that are not stored \(novelty\)"):
        RecipeBook({32: recipe}, score_spread={"qfilters": _spread(n_layers, n_heads)["qfilters"]})
    book = RecipeBook({32: recipe}, score_spread=_spread(n_layers, n_heads))
    cache = QFiltersCache(tiny_llama.model, QFilters(_filters((n_layers, n_heads, dim))).with_recipe(book), budget=32)
    policies = {i: layer.policy for i, layer in enumerate(cache.layers) if getattr(layer, "policy", None) is not None}
    last, first = max(policies), min(policies)
    assert isinstance(policies[last].scorer.inner, NoveltyScorer)
    assert torch.allclose(policies[last].scorer.rates[last], torch.full((n_heads,), 0.25 * 0.5 / 32))
    assert torch.allclose(policies[first].scorer.rates[first],
                          torch.tensor([0.25 * (2.0 + first + h) / 32 for h in range(n_heads)]))


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("score_spread"), "spreads that are not stored"),
    (lambda r: r["by_budget"]["32"].update(recency_weight=-1), "recency_weight"),
    (lambda r: r["by_budget"]["32"].update(recency_weight=1e9), "recency_weight"),
    (lambda r: r["by_budget"]["32"].update(recency_weight="fast"), "wrong type"),
    (lambda r: r["by_budget"]["32"].update(scorer="streamingllm"), "recency_weight discounts"),
])
def test_a_malformed_aged_recipe_is_refused_with_the_reason(tmp_path, change, message) -> None:
    book = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", recency_weight=0.5)},
                      score_spread={"qfilters": _spread(2, 3)["qfilters"]})
    QFilters(_filters()).with_recipe(book).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "qfilters.json").read_text())
    change(meta["recipe"])
    (tmp_path / "qfilters.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message):
        QFilters.from_pretrained(tmp_path)


def test_spreads_for_another_model_are_refused_when_the_cache_is_built(tiny_llama) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    book = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", recency_weight=0.5)},
                      score_spread={"qfilters": _spread(n_layers - 1, n_heads)["qfilters"]})
    with pytest.raises(ShapeMismatchError, match="does not cover the compressed layers.*this model"):
        QFiltersCache(tiny_llama.model, QFilters(_filters((n_layers, n_heads, dim))).with_recipe(book), budget=32)
    wide = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", recency_weight=0.5)},
                      score_spread={"qfilters": _spread(n_layers, n_heads + 1)["qfilters"]})
    with pytest.raises(ShapeMismatchError, match="rates"):
        QFiltersCache(tiny_llama.model, QFilters(_filters((n_layers, n_heads, dim))).with_recipe(wide), budget=32)
