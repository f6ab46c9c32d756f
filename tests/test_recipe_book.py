"""The eviction recipe a validation chose travels in qfilters.json and is what QFiltersCache uses by default."""

from __future__ import annotations

import json

import pytest
import torch

from qfilters.artifact import QFilters
from qfilters.cache import QFiltersCache, cache_kwargs
from qfilters.errors import ArtifactError
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import Recipe, RecipeBook
from qfilters.scorers import KNormScorer, QFilterScorer

BOOK = RecipeBook({64: Recipe("knorm", 0.25, 2, "uniform"), 256: Recipe("qfilters", 0.5, 0, "pyramid")},
                  searched_on="handbook:en (calibration text)")


def _filters() -> QFilters:
    return QFilters(torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(3)))


def _layer_policies(cache: QFiltersCache) -> list[EvictionPolicy | None]:
    return [getattr(layer, "policy", None) for layer in cache.layers]


def test_nearest_searched_budget_on_a_log_scale() -> None:
    assert BOOK.recipe_for(64).scorer == "knorm" and BOOK.recipe_for(100).scorer == "knorm"
    assert BOOK.recipe_for(128).scorer == "knorm"  # equally far from 64 and 256: the smaller wins
    assert BOOK.recipe_for(129).scorer == "qfilters" and BOOK.recipe_for(4096).scorer == "qfilters"
    with pytest.raises(ValueError, match="positive"):
        BOOK.recipe_for(0)
    # exact ties on the ratio go to the smaller budget (6 is 1.5x from both 4 and 9)
    odd = RecipeBook({4: Recipe("knorm"), 9: Recipe("qfilters")})
    assert odd.recipe_for(6).scorer == "knorm" and odd.recipe_for(7).scorer == "qfilters"


def test_round_trip_through_qfilters_json(tmp_path) -> None:
    filters = _filters().with_recipe(BOOK)
    filters.save_pretrained(tmp_path / "a")
    stored = json.loads((tmp_path / "a" / "qfilters.json").read_text())["recipe"]
    assert stored["by_budget"]["256"] == {"scorer": "qfilters", "window_share": 0.5, "n_sinks": 0,
                                          "allocation": "pyramid", "full_layers": 0}
    loaded = QFilters.from_pretrained(tmp_path / "a")
    assert loaded.recipe == BOOK and torch.equal(loaded.filters, filters.filters)
    # the public files are untouched: kvpress and the official loader read config.json + model.safetensors only
    plain = tmp_path / "b"
    _filters().save_pretrained(plain)
    for name in ("config.json", "model.safetensors"):
        assert (plain / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert "recipe" not in json.loads((plain / "qfilters.json").read_text())
    assert QFilters.from_pretrained(plain).recipe is None


@pytest.mark.parametrize("bad, message", [
    ({"by_budget": {"64": {"scorer": "knorm", "window_share": 2.0}}}, "window_share"),
    ({"by_budget": {"x": {"scorer": "knorm"}}}, "not a positive integer"),
    ({"by_budget": {"64": {"scorer": "knorm", "rm -rf": 1}}}, "unknown recipe field"),
    ({"by_budget": {}}, "at least one budget"),
    ({"by_budget": {"64": {"scorer": "knorm", "allocation": "sensitivity"}}}, "sensitivity"),
    ([1, 2], "JSON object"),
    ({"by_budget": {"64": {"scorer": "meanq"}}}, "filters alone"),
    ({"by_budget": {"64": {"scorer": "nope"}}}, "filters alone"),
    ({"by_budget": {"64": {"scorer": "knorm", "n_sinks": None}}}, "null"),
    ({"by_budget": {"064": {"scorer": "knorm"}}}, "not a positive integer"),
    ({"by_budget": {"64": {"scorer": "knorm", "allocation": "sensitivity"}}, "sensitivity": [1.0, float("nan")]},
     "finite"),
    ({"by_budget": {"64": {"scorer": "knorm", "full_layers": 2}}}, "layers whole"),
    ({"by_budget": {"64": {"scorer": "knorm", "novelty_layers": "all"}}}, "wrong type"),
    ({"by_budget": {"64": {"scorer": "knorm", "novelty_layers": -0.5}}}, "novelty_layers"),
])
def test_a_malformed_recipe_is_refused_with_the_reason(tmp_path, bad, message) -> None:
    _filters().with_recipe(BOOK).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "qfilters.json").read_text())
    meta["recipe"] = bad
    (tmp_path / "qfilters.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message):
        QFilters.from_pretrained(tmp_path)


def test_cache_from_filters_uses_the_stored_recipe(tiny_llama) -> None:
    filters = _filters().with_recipe(BOOK)
    model = tiny_llama.model
    # budget 64 -> the knorm recipe: window 25% of 64 = 16, 2 sinks, K-norm scorer in every layer
    cache = QFiltersCache(model, filters, budget=64)
    policies = _layer_policies(cache)
    assert all(isinstance(p.scorer, KNormScorer) and (p.budget, p.window, p.n_sinks) == (64, 16, 2)
               for p in policies)
    assert policies == list(BOOK.policy(64, model, ScorerInputs(filters=filters)).layers.values())
    # budget 512 -> the qfilters pyramid recipe: the same total; above 2 keys each, 1.5x vs 0.5x of the rest
    policies = _layer_policies(QFiltersCache(model, filters, budget=512))
    assert [p.budget for p in policies] == [2 + 765, 2 + 255]
    assert all(isinstance(p.scorer, QFilterScorer) for p in policies)
    # one argument away: the stock policy, or another recipe
    stock = _layer_policies(QFiltersCache(model, filters, budget=128, recipe=None))
    assert all(isinstance(p.scorer, QFilterScorer) and (p.budget, p.window, p.n_sinks) == (128, 64, 0) for p in stock)
    assert _layer_policies(QFiltersCache(model, filters, budget=64, recipe=None, window=8))[0].window == 8
    other = _layer_policies(QFiltersCache(model, filters, budget=64, recipe=Recipe("qfilters", 0.125)))
    assert other[0].window == 8 and isinstance(other[0].scorer, QFilterScorer)
    # filters without a recipe: the stock policy, as before
    plain = _layer_policies(QFiltersCache(model, _filters(), budget=128))[0]
    assert isinstance(plain.scorer, QFilterScorer) and (plain.budget, plain.window, plain.n_sinks) == (128, 64, 0)


def test_cache_refuses_ambiguous_arguments(tiny_llama) -> None:
    filters = _filters().with_recipe(BOOK)
    with pytest.raises(TypeError, match="recipe=None"):
        QFiltersCache(tiny_llama.model, filters, budget=64, window=8)
    with pytest.raises(TypeError, match="budget"):
        QFiltersCache(tiny_llama.model, filters)
    with pytest.raises(TypeError, match="filter set"):
        QFiltersCache(tiny_llama.model, KNormScorer(), budget=64, recipe=None)
    whole = _filters().with_recipe(RecipeBook({64: Recipe("knorm", full_layers=1)}))
    with pytest.raises(ValueError, match="context_length"):
        QFiltersCache(tiny_llama.model, whole, budget=64)
    with pytest.raises(TypeError, match="int"):
        QFiltersCache(tiny_llama.model, filters, budget=64.0)
    with pytest.raises(TypeError, match="stock policy"):
        QFiltersCache(tiny_llama.model, filters, budget=64, recipe=None, context_length=100)
    cache = QFiltersCache(tiny_llama.model, whole, budget=64, context_length=100)
    assert _layer_policies(cache)[0] is None and _layer_policies(cache)[1].budget == 2 * 64 - 100


def test_recipe_cache_generates(tiny_llama) -> None:
    filters = _filters().with_recipe(BOOK)
    ids = torch.randint(3, 20, (1, 90), generator=torch.Generator().manual_seed(0))
    cache = QFiltersCache(tiny_llama.model, filters, budget=64)
    out = tiny_llama.model.generate(ids, **cache_kwargs(tiny_llama.model, cache), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 95)
    assert all(layer.keys.shape[-2] <= 64 for layer in cache.layers)
    assert isinstance(BOOK.policy(64, tiny_llama.model, ScorerInputs(filters=filters)), LayerwisePolicy)


def test_eval_and_passkey_compare_the_stored_recipe(tiny_llama) -> None:
    from qfilters.data.chunks import select_chunks
    from qfilters.evaluate import evaluate_chunks, evaluate_policies
    from qfilters.passkey import standard_policies
    from tests.test_validation import _corpus

    filters = _filters().with_recipe(BOOK)
    kw = dict(budgets=[48], window=12, seq_len=128, score_last=64, max_docs=2, progress=False)
    result = evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, _corpus(3), filters, **kw)
    assert result.policies == ["qfilters", "knorm", "streamingllm", "recipe"]
    assert result.config["recipe"] == BOOK.to_dict()
    chunks = select_chunks(tiny_llama.tokenizer, _corpus(3), 128, 2)
    direct = evaluate_chunks(tiny_llama.model, chunks, {("r", 48): BOOK.policy(
        48, tiny_llama.model, ScorerInputs(filters=filters), 128)}, score_last=64)
    assert result.perplexity("recipe", 48) == direct.perplexity("r", 48)
    plain = evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, _corpus(3), _filters(), **kw)
    assert "recipe" not in plain.policies  # filters without a recipe: the same comparison as before
    with pytest.raises(ValueError, match="search-recipe"):
        evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, _corpus(3), _filters(), policies=["recipe"], **kw)
    policies = standard_policies(tiny_llama.model, [48], 12, filters, context_length=128)
    assert isinstance(policies["recipe@48"], LayerwisePolicy)
    assert "recipe@48" not in standard_policies(tiny_llama.model, [48], 12, _filters())


def test_a_sensitivity_recipe_travels_with_its_weights_and_the_cache_spends_them(tiny_llama, tmp_path) -> None:
    """What the validator ships when it picks the sensitivity allocation: the weights are in qfilters.json, and a
    cache built from the loaded filters gives each layer the budget they say (same total as uniform)."""
    from qfilters.architecture import compressed_layers
    from qfilters.recipes import allocate

    layers = compressed_layers(tiny_llama.model)
    weights = tuple(float(i % 3) for i in range(len(layers)))
    book = RecipeBook({32: Recipe("qfilters", 0.5, 2, "sensitivity")}, weights, context_length=128)
    filters = QFilters(torch.randn(*tiny_llama.info.filter_shape, generator=torch.Generator().manual_seed(2)))
    path = filters.with_recipe(book).save_pretrained(tmp_path / "f")
    assert json.loads((path / "qfilters.json").read_text())["recipe"]["sensitivity"] == list(weights)
    loaded = QFilters.from_pretrained(path)
    assert loaded.recipe == book
    cache = QFiltersCache(tiny_llama.model, loaded, budget=32)
    budgets = [p.budget for p in _layer_policies(cache) if p is not None]
    assert budgets == allocate("sensitivity", 32, len(layers), 4, weights) and sum(budgets) == 32 * len(layers)
    assert len(set(budgets)) > 1  # the weights did move memory between layers


def test_a_novelty_recipe_ranks_the_last_layers_by_novelty(tiny_llama, tmp_path) -> None:
    """The retrieval gate's recipes: the later share of the compressed layers ranks old keys by novelty, the rest by
    the recipe's scorer; it travels in qfilters.json and the cache uses it."""
    from qfilters.architecture import compressed_layers
    from qfilters.scorers import NoveltyScorer

    layers = compressed_layers(tiny_llama.model)
    book = RecipeBook({32: Recipe("qfilters", 0.25, 2, "uniform", novelty_layers=0.5)})
    filters = QFilters(torch.randn(*tiny_llama.info.filter_shape, generator=torch.Generator().manual_seed(2)))
    path = filters.with_recipe(book).save_pretrained(tmp_path / "f")
    meta = json.loads((path / "qfilters.json").read_text())
    assert meta["recipe"]["by_budget"]["32"]["novelty_layers"] == 0.5
    # format 2 only when a recipe needs it: qfilters versions that predate novelty say "upgrade", not "malformed"
    assert meta["format_version"] == 2
    filters.with_recipe(BOOK).save_pretrained(tmp_path / "old")
    assert json.loads((tmp_path / "old" / "qfilters.json").read_text())["format_version"] == 1
    loaded = QFilters.from_pretrained(path)
    assert loaded.recipe == book
    policies = [p for p in _layer_policies(QFiltersCache(tiny_llama.model, loaded, budget=32)) if p is not None]
    assert len(policies) == len(layers) == 2
    assert isinstance(policies[0].scorer, QFilterScorer) and isinstance(policies[1].scorer, NoveltyScorer)
    assert (policies[0].n_sinks, policies[1].n_sinks) == (2, 4)  # the novelty layer's own sinks are counted
    assert "novelty" in Recipe("knorm", novelty_layers=1.0).describe() and Recipe("knorm").to_dict().keys() == {
        "scorer", "window_share", "n_sinks", "allocation", "full_layers"}  # the default stays out: older readers
    with pytest.raises(ValueError, match="novelty_layers"):
        Recipe("knorm", novelty_layers=1.5)


@pytest.mark.parametrize("full_layers, novelty_layers, split", [
    (0, 0.0, ([], [3, 4, 5, 6, 7, 8], [])),
    (2, 0.5, ([3, 4], [5, 6], [7, 8])),
    (1, 1.0, ([3], [], [4, 5, 6, 7, 8])),
    (0, 0.4, ([], [3, 4, 5, 6], [7, 8])),  # round(0.4 x 6) = 2 novelty layers, counted from the last
])
def test_a_recipe_splits_its_layers_into_whole_scored_and_novelty_ones(full_layers, novelty_layers, split) -> None:
    """One split, read by both the per-layer policies and the recall heads: the first layers whole, the last share
    by novelty, the rest by the scorer (in the model's layer numbers, not positions)."""
    from qfilters.recipes import layer_policies, layer_roles
    from qfilters.scorers import NoveltyScorer

    recipe = Recipe("knorm", 0.25, 0, "uniform", full_layers=full_layers, novelty_layers=novelty_layers)
    layers = [3, 4, 5, 6, 7, 8]
    assert layer_roles(recipe, layers) == split
    whole, ranked, novel = split
    policy = layer_policies(recipe, KNormScorer(), 64, layers, 80, novelty=NoveltyScorer())
    assert [i for i in layers if policy.for_layer(i) is None] == whole
    assert [i for i in layers if isinstance(getattr(policy.for_layer(i), "scorer", None), KNormScorer)] == ranked
    assert [i for i in layers if isinstance(getattr(policy.for_layer(i), "scorer", None), NoveltyScorer)] == novel
