"""Content novelty: novelty of what a key says, with RoPE undone from its known position. It must invert the model's
own rotation, not depend on where a text sits, stay causal (one pass == decoding), and travel in recipes."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from qfilters.artifact import QFilters
from qfilters.cache import QFiltersCache
from qfilters.errors import ShapeMismatchError
from qfilters.evaluate import perplexity, perplexity_reference
from qfilters.policy import EvictionPolicy
from qfilters.policy_table import ScorerInputs, build_scorer
from qfilters.recipes import Recipe, RecipeBook
from qfilters.rope import rope_frequencies, unrotate
from qfilters.scorers import BlendScorer, ContentNoveltyScorer, NoveltyScorer


def _rotate(model, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Keys as the model caches them at ``positions``: its own rotary embedding, its own apply function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = model.model.rotary_emb(keys, positions[None])
    rotated, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    return rotated


def test_unrotate_inverts_the_models_own_rope(tiny_llama) -> None:
    model = tiny_llama.model
    n_layers, n_kv, dim = tiny_llama.info.filter_shape
    freqs = rope_frequencies(model)
    assert freqs.shape == (n_layers, dim // 2) and freqs.dtype == torch.float64
    content = torch.randn(1, n_kv, 7, dim, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(300, 307)
    back = unrotate(_rotate(model, content, positions), positions, freqs[0])
    assert torch.allclose(back.float(), content, atol=1e-4)
    # partial rotary: dimensions past the rotated ones pass through
    half = unrotate(content, positions, freqs[0][: dim // 4])
    assert torch.equal(half[..., dim // 2:].float(), content[..., dim // 2:])
    # a config gives the same frequencies: transformers builds the model type's rotary module from it
    assert torch.equal(rope_frequencies(model.config), freqs)
    with pytest.raises(ValueError, match="pass the loaded model"):
        rope_frequencies(SimpleNamespace(model_type="no_such_model", num_hidden_layers=2))
    with pytest.raises(ValueError, match="not a transformers model type"):  # it names a module to import
        rope_frequencies(SimpleNamespace(model_type="llama.modeling_llama", num_hidden_layers=2))
    with pytest.raises(ValueError, match="at least"):
        unrotate(content, positions, torch.ones(dim))


def test_content_novelty_scores_the_keys_as_they_were_before_rope(tiny_llama) -> None:
    """On cached keys it equals plain novelty on the same keys before the rotation; plain novelty on the cached keys
    differs (the rotation between positions is part of what it compares)."""
    model = tiny_llama.model
    _, n_kv, dim = tiny_llama.info.filter_shape
    content = torch.randn(1, n_kv, 40, dim, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(100, 140)
    cached = _rotate(model, content, positions)
    scores = ContentNoveltyScorer(n_sinks=0, frequencies=rope_frequencies(model)).score(cached, 0, positions)
    plain = NoveltyScorer(n_sinks=0)
    assert torch.allclose(scores, plain.score(content, 0, positions), atol=1e-4)
    assert not torch.allclose(plain.score(cached, 0, positions), scores, atol=1e-2)


def test_repeated_content_scores_as_repeated_only_once_rope_is_undone(tiny_llama) -> None:
    """Keys that all say one thing, cached at their positions, and one that says the opposite: content novelty scores
    the repeats as repeats (cosine ~1 with the running sum) and the one-off as the most novel; to plain novelty the
    rotation between positions makes the repeats look partly new."""
    model = tiny_llama.model
    _, n_kv, dim = tiny_llama.info.filter_shape
    base = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, n_kv, 60, dim, generator=torch.Generator().manual_seed(3))
    content = base.expand(1, n_kv, 60, dim) + 0.05 * noise
    content[0, :, 45] = -base
    positions = torch.arange(60)
    keys = _rotate(model, content, positions)
    scores = ContentNoveltyScorer(frequencies=rope_frequencies(model)).score(keys, 0, positions)[0, :, 4:]
    plain = NoveltyScorer().score(keys, 0, positions)[0, :, 4:]
    repeats = torch.ones(56, dtype=torch.bool)
    repeats[45 - 4] = False
    assert bool((scores.argmax(dim=-1) == 45 - 4).all()) and bool((scores[:, 45 - 4] > 0.99).all())
    assert bool((scores[:, repeats] < -0.99).all())
    assert bool((plain[:, repeats].max(dim=-1).values > -0.9).all())


def test_content_novelty_is_causal_so_one_pass_equals_decoding(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    freqs = rope_frequencies(model)
    scorer = ContentNoveltyScorer(frequencies=freqs)
    keys, positions = torch.randn(2, 2, 50, 16), torch.arange(50)
    whole = scorer.score(keys, 1, positions)
    pieces, state = [], None
    for a, b in ((0, 9), (9, 10), (10, 50)):
        part, state = scorer.score_stream(keys[:, :, a:b], 1, positions[a:b], state)
        pieces.append(part)
    assert torch.equal(torch.cat(pieces, dim=-1), whole)
    ids = torch.randint(4, 90, (2, 64), generator=torch.Generator().manual_seed(3))
    blend = BlendScorer(base=build_scorer("knorm"), weights=torch.full((2, 2), 0.5), frequencies=freqs)
    for policy in (EvictionPolicy(scorer, 20, 4, n_sinks=2), EvictionPolicy(blend, 18, 4)):
        fast, slow = perplexity(model, ids, policy), perplexity_reference(model, ids, policy)
        assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9


def test_content_novelty_needs_the_models_frequencies() -> None:
    with pytest.raises(ValueError, match="rotary frequencies"):
        build_scorer("content-novelty", ScorerInputs())
    with pytest.raises(ShapeMismatchError, match="frequencies"):
        ContentNoveltyScorer(frequencies=torch.ones(3))
    scorer = ContentNoveltyScorer(frequencies=torch.ones(2, 8))
    with pytest.raises(ShapeMismatchError, match="do not fit"):
        scorer.check_model(3, 2, 16)
    with pytest.raises(ShapeMismatchError, match="layer 5"):
        scorer.score(torch.randn(1, 2, 4, 16), 5, torch.arange(4))


def _spread(n_layers: int, n_heads: int) -> dict:
    return {"qfilters": tuple(tuple(2.0 for _ in range(n_heads)) for _ in range(n_layers)),
            "content-novelty": tuple(tuple(0.25 for _ in range(n_heads)) for _ in range(n_layers))}


def test_a_content_novelty_recipe_travels_and_the_cache_reads_the_models_rope(tiny_llama, tmp_path) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    recipe = Recipe("qfilters", 0.25, 0, "uniform", novelty_weight=0.5, novelty_layers=0.5,
                    novelty_scorer="content-novelty")
    book = RecipeBook({32: recipe}, score_spread=_spread(n_layers, n_heads))
    filters = QFilters(torch.randn(n_layers, n_heads, dim, generator=torch.Generator().manual_seed(4)))
    path = filters.with_recipe(book).save_pretrained(tmp_path / "f")
    stored = json.loads((path / "qfilters.json").read_text())["recipe"]["by_budget"]["32"]
    assert stored["novelty_scorer"] == "content-novelty"
    assert "novelty_scorer" not in Recipe("qfilters", novelty_weight=0.5).to_dict()  # older readers load it
    assert "content-novelty" in recipe.label and "RoPE undone" in recipe.describe()
    assert recipe.spreads_needed() == {"qfilters", "content-novelty"}
    loaded = QFilters.from_pretrained(path)
    assert loaded.recipe == book
    policies = [layer.policy for layer in QFiltersCache(tiny_llama.model, loaded, budget=32).layers
                if getattr(layer, "policy", None) is not None]
    assert isinstance(policies[0].scorer, BlendScorer) and policies[0].scorer.frequencies is not None
    assert isinstance(policies[-1].scorer, ContentNoveltyScorer)  # the later half ranks by content novelty
    assert torch.allclose(policies[0].scorer.frequencies, rope_frequencies(tiny_llama.model))
    # a cache built from the config alone (e.g. before the weights are loaded) reads the same RoPE
    from_config = [layer.policy for layer in QFiltersCache(tiny_llama.model.config, loaded, budget=32).layers
                   if getattr(layer, "policy", None) is not None]
    assert torch.equal(from_config[0].scorer.frequencies, policies[0].scorer.frequencies)
    # the blend counts content novelty in ITS spread, not plain novelty's
    assert torch.allclose(policies[0].scorer.weights, torch.full((n_layers, n_heads), 0.5 * 2.0 / 0.25))
    with pytest.raises(ValueError, match="novelty_scorer"):
        Recipe("qfilters", novelty_scorer="attention")
    with pytest.raises(ValueError, match="wrong type"):
        Recipe.from_dict({"scorer": "qfilters", "novelty_scorer": 3})
    with pytest.raises(ValueError, match="content-novelty"):  # its spread is not plain novelty's
        RecipeBook({32: Recipe("qfilters", novelty_weight=0.5, novelty_scorer="content-novelty")},
                   score_spread={"qfilters": _spread(n_layers, n_heads)["qfilters"], "novelty": ((1.0,),)})


def test_qfilters_eval_compares_content_novelty_by_name(tiny_llama) -> None:
    """``qfilters eval --policy content-novelty``: the evaluator reads the model's RoPE itself."""
    from types import SimpleNamespace

    from qfilters.evaluate import evaluate_policies

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8
    corpus = SimpleNamespace(documents=[SimpleNamespace(title="d", text=text)], spec="test", sha256="0" * 64)
    result = evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, corpus, None, budgets=[24], window=4,
                               seq_len=96, score_last=32, policies=["full", "novelty", "content-novelty"],
                               progress=False)
    rows = {(r.policy, r.budget): r.perplexity for r in result.rows}
    assert ("content-novelty", 24) in rows and rows["content-novelty", 24] != rows["novelty", 24]
