"""Blend recipes: Q-Filters (or K-norm) plus novelty, each in units of its spread on calibration text. The blend is
causal like novelty, so the one-pass evaluator must still equal decoding, and the spreads travel in qfilters.json."""

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
from qfilters.recipes import Recipe, RecipeBook, score_spread
from qfilters.scorers import BlendScorer, KNormScorer, NoveltyScorer, QFilterScorer


def _keys(length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, length, 8, generator=torch.Generator().manual_seed(seed))


def _filters(shape=(2, 3, 8), seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_blend_is_the_base_plus_weighted_novelty_with_sinks_forced() -> None:
    keys, positions = _keys(), torch.arange(40)
    base = QFilterScorer(_filters())
    weights = torch.tensor([[0.0, 1.0, 1e5], [2.0, 2.0, 2.0]])
    blend = BlendScorer(base=base, weights=weights).score(keys, 0, positions)
    novelty = NoveltyScorer(n_sinks=0).score(keys, 0, positions)
    expected = base.score(keys, 0, positions) + weights[0][None, :, None] * novelty
    assert torch.isinf(blend[..., :4]).all()  # the first key is its own running sum: a sink, not the least novel
    assert torch.allclose(blend[..., 4:], expected[..., 4:])
    # weight 0 ranks like the base; a heavy weight ranks like novelty
    assert torch.equal(blend[:, 0, 4:].argsort(), base.score(keys, 0, positions)[:, 0, 4:].argsort())
    assert torch.equal(blend[:, 2, 4:].argsort(), novelty[:, 2, 4:].argsort())


def test_scoring_in_pieces_equals_scoring_the_whole_sequence() -> None:
    keys = _keys(50)
    blend = BlendScorer(base=KNormScorer(), weights=torch.full((2, 3), 0.7))
    whole = blend.score(keys, 1, torch.arange(50))
    pieces, state = [], None
    for a, b in ((0, 3), (3, 20), (20, 21), (21, 50)):
        part, state = blend.score_stream(keys[:, :, a:b], 1, torch.arange(a, b), state)
        pieces.append(part)
    assert torch.equal(torch.cat(pieces, dim=-1), whole)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"base": NoveltyScorer(), "weights": torch.ones(2, 3)}, TypeError, "static scorer"),
    ({"base": None, "weights": torch.ones(2, 3)}, TypeError, "Scorer"),
    ({"base": KNormScorer(), "weights": torch.ones(3)}, ShapeMismatchError, "num_layers"),
    ({"base": KNormScorer(), "weights": torch.tensor([[1.0, float("nan")]])}, ValueError, "finite"),
    ({"base": KNormScorer(), "weights": -torch.ones(2, 3)}, ValueError, "non-negative"),
])
def test_a_malformed_blend_is_refused(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        BlendScorer(**kwargs)


def test_one_pass_evaluation_is_exact_against_the_cache(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    blend = BlendScorer(base=QFilterScorer(_filters((n_layers, n_heads, dim)).double()),
                        weights=torch.full((n_layers, n_heads), 3.0))
    ids = torch.randint(4, 90, (2, 64), generator=torch.Generator().manual_seed(1))
    policy = EvictionPolicy(blend, 20, 4, n_sinks=4)
    fast, slow = perplexity(model, ids, policy), perplexity_reference(model, ids, policy)
    assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9


def test_score_spread_measures_each_scorers_scale_per_layer_and_head(tiny_llama) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    filters = _filters((n_layers, n_heads, dim))
    ids = torch.randint(4, 90, (1, 96), generator=torch.Generator().manual_seed(5))
    spread = score_spread(tiny_llama.model, ids, {"qfilters": QFilterScorer(filters),
                                                  "qfilters_x3": QFilterScorer(3 * filters),
                                                  "novelty": NoveltyScorer(n_sinks=0)})
    assert set(spread) == {"qfilters", "qfilters_x3", "novelty"}
    for table in spread.values():
        assert len(table) == n_layers and all(len(row) == n_heads and all(x > 0 for x in row) for row in table)
    # it is the scale of the scores: filters three times longer, scores three times wider
    for row, row3 in zip(spread["qfilters"], spread["qfilters_x3"], strict=True):
        assert row3 == pytest.approx([3 * x for x in row], rel=1e-5)
    assert all(x <= 1.0 for row in spread["novelty"] for x in row)  # a cosine
    with pytest.raises(ValueError, match="tokens"):
        score_spread(tiny_llama.model, ids[:, :5], {"novelty": NoveltyScorer(n_sinks=0)})


def _spread(n_layers: int, n_heads: int) -> dict:
    return {"qfilters": tuple(tuple(2.0 + i + h for h in range(n_heads)) for i in range(n_layers)),
            "novelty": tuple(tuple(0.5 for _ in range(n_heads)) for _ in range(n_layers))}


def test_a_blend_recipe_travels_with_its_spreads_and_the_cache_uses_them(tiny_llama, tmp_path) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    book = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", novelty_weight=0.5)},
                      score_spread=_spread(n_layers, n_heads))
    filters = QFilters(_filters((n_layers, n_heads, dim)))
    path = filters.with_recipe(book).save_pretrained(tmp_path / "f")
    meta = json.loads((path / "qfilters.json").read_text())
    assert meta["format_version"] == 2  # older readers say "upgrade", not "malformed"
    assert meta["recipe"]["by_budget"]["32"]["novelty_weight"] == 0.5
    assert meta["recipe"]["score_spread"]["qfilters"][1] == [3.0 + h for h in range(n_heads)]
    loaded = QFilters.from_pretrained(path)
    assert loaded.recipe == book
    policies = [layer.policy for layer in QFiltersCache(tiny_llama.model, loaded, budget=32).layers
                if getattr(layer, "policy", None) is not None]
    assert policies and all(isinstance(p.scorer, BlendScorer) for p in policies)
    assert all(p.n_sinks == 4 for p in policies)  # the blend's own sinks, counted in the budget
    # weight = novelty_weight x spread(qfilters) / spread(novelty): both scores in units of their spread
    expected = torch.tensor([[0.5 * (2.0 + i + h) / 0.5 for h in range(n_heads)] for i in range(n_layers)])
    assert torch.allclose(policies[0].scorer.weights, expected)
    assert "novelty" in Recipe("qfilters", novelty_weight=0.5).describe()
    assert "novelty_weight" not in Recipe("qfilters").to_dict()  # the default stays out: older readers


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("score_spread"), "spreads that are not stored"),
    (lambda r: r["score_spread"].pop("novelty"), "spreads that are not stored"),
    (lambda r: r["score_spread"].update(novelty=[[1.0], [1.0, 2.0]]), "table"),
    (lambda r: r["score_spread"].update(novelty=[[-1.0]]), "non-negative"),
    (lambda r: r["score_spread"].update(novelty="wide"), "score_spread"),
    (lambda r: r["by_budget"]["32"].update(novelty_weight=-1), "novelty_weight"),
    (lambda r: r["by_budget"]["32"].update(novelty_weight=1e9), "novelty_weight"),
    (lambda r: r["by_budget"]["32"].update(novelty_weight="some"), "wrong type"),
])
def test_a_malformed_blend_recipe_is_refused_with_the_reason(tmp_path, change, message) -> None:
    book = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", novelty_weight=0.5)}, score_spread=_spread(2, 3))
    QFilters(_filters()).with_recipe(book).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "qfilters.json").read_text())
    change(meta["recipe"])
    (tmp_path / "qfilters.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message):
        QFilters.from_pretrained(tmp_path)


def test_spreads_for_another_model_are_refused_when_the_cache_is_built(tiny_llama) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    book = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", novelty_weight=0.5)},
                      score_spread=_spread(n_layers + 1, n_heads))
    with pytest.raises(ShapeMismatchError, match="blend weights"):
        QFiltersCache(tiny_llama.model, QFilters(_filters((n_layers, n_heads, dim))).with_recipe(book), budget=32)
