"""Recall heads: the KV heads a question reads a detail back through, measured once on calibration text, then ranked
by novelty alone in a recipe. The measurement must be the model's real attention, the ranking deterministic, the
switched heads causal like any blend (one pass == decoding), and the table must travel in qfilters.json."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from qfilters.artifact import QFilters
from qfilters.cache import QFiltersCache
from qfilters.errors import ArtifactError
from qfilters.evaluate import perplexity, perplexity_reference
from qfilters.passkey import make_trials
from qfilters.policy import EvictionPolicy
from qfilters.recall_heads import needle_attention, top_heads
from qfilters.recipes import Recipe, RecipeBook
from qfilters.scorers import AgedScorer, BlendScorer, NoveltyScorer, QFilterScorer

FILLER = " ".join(f"word{i % 37} and line {i % 11}." for i in range(2000))


def _eager_needle_attention(model, trials) -> torch.Tensor:
    """The same quantity from the model's own eager attention weights over the whole sequence at once."""
    cfg = model.config
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    for layer in eager.model.layers:
        layer.self_attn.config._attn_implementation = "eager"
    out = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, dtype=torch.float64)
    for trial in trials:
        seq = torch.tensor([trial.context + trial.question + trial.answer])
        with torch.inference_mode():
            attentions = eager(seq, output_attentions=True).attentions
        first = len(trial.context) + len(trial.question) - 1
        rows = slice(first, first + len(trial.answer))
        start, end = trial.needle
        for i, attn in enumerate(attentions):  # [1, Hq, T, T]
            mass = attn[0, :, rows, start:end].sum(-1).mean(-1).double()  # [Hq]
            out[i] += mass.reshape(cfg.num_key_value_heads, -1).max(dim=-1).values
    return out / len(trials)


def test_needle_attention_is_the_models_own_attention_on_the_needle(tiny_llama) -> None:
    trials = make_trials(tiny_llama.tokenizer, FILLER, 3, 280, seed=0)
    for trial in trials:  # each trial knows where its needle is
        start, end = trial.needle
        text = tiny_llama.tokenizer.decode(trial.context[start:end]).replace(" ", "")  # a character per token
        assert text == f"Thepasskeyis{trial.key}.Rememberit.{trial.key}isthepasskey."
    measured = needle_attention(tiny_llama.model, trials)
    assert measured.shape == (2, 2) and measured.dtype == torch.float64
    assert torch.allclose(measured, _eager_needle_attention(tiny_llama.model, trials), atol=1e-5)
    assert ((measured > 0) & (measured <= 1)).all()
    with pytest.raises(ValueError, match="at least one"):
        needle_attention(tiny_llama.model, [])


def test_recall_heads_are_few_and_in_the_middle_layers_of_smollm2(smollm2) -> None:
    """What makes switching a handful of heads worth it: on a real model a few heads read the needle, most do not."""
    from qfilters.data import load_corpus

    text = "\n".join(d.text for d in load_corpus("handbook:en").documents)
    table = needle_attention(smollm2.model, make_trials(smollm2.tokenizer, text, 4, 1024, seed=1))
    flat = table.flatten().sort(descending=True).values
    assert flat[0] > 0.5 and flat[:8].mean() > 0.4 and flat.median() < 0.1
    best = top_heads(table, 4, range(table.shape[0]))
    assert all(10 <= layer <= 25 for layer, _ in best)  # of 30 layers: neither the first nor the last


def test_top_heads_ranks_within_the_given_layers_deterministically() -> None:
    table = [[0.1, 0.9], [0.9, 0.3], [0.95, 0.0]]
    assert top_heads(table, 3, range(3)) == [(2, 0), (0, 1), (1, 0)]  # ties: the earlier layer first
    assert top_heads(table, 2, [0, 1]) == [(0, 1), (1, 0)]  # layer 2 is not ranked (kept whole, novelty...)
    assert top_heads(table, 0, range(3)) == []
    with pytest.raises(ValueError, match="have 4 KV heads"):
        top_heads(table, 5, [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        top_heads(table, -1, range(3))


def _keys(length: int = 40) -> torch.Tensor:
    return torch.randn(2, 3, length, 8, generator=torch.Generator().manual_seed(0))


def test_solo_heads_rank_by_novelty_alone_and_the_others_by_the_blend() -> None:
    keys, positions = _keys(), torch.arange(40)
    base = QFilterScorer(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3)))
    solo = torch.tensor([[False, True, False], [False, False, False]])
    weights = torch.full((2, 3), 0.5)
    switched = BlendScorer(base=base, weights=weights, solo=solo).score(keys, 0, positions)
    plain = BlendScorer(base=base, weights=weights).score(keys, 0, positions)
    novelty = NoveltyScorer(n_sinks=4).score(keys, 0, positions)
    assert torch.equal(switched[:, 1], novelty[:, 1])
    assert torch.equal(switched[:, [0, 2]], plain[:, [0, 2]])
    # weights 0 with solo heads: the other heads keep the base's scores exactly (past the sinks)
    only = BlendScorer(base=base, weights=torch.zeros(2, 3), solo=solo).score(keys, 0, positions)
    assert torch.equal(only[:, 0, 4:], base.score(keys, 0, positions)[:, 0, 4:])
    assert BlendScorer(base=base, weights=weights, solo=solo).describe()["solo"] == [[0, 1]]
    with pytest.raises(Exception, match="solo must be a bool tensor"):
        BlendScorer(base=base, weights=weights, solo=torch.ones(2, 3))
    with pytest.raises(Exception, match="solo must be a bool tensor"):
        BlendScorer(base=base, weights=weights, solo=torch.ones(3, 3, dtype=torch.bool))


def test_one_pass_evaluation_is_exact_with_recall_heads(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    solo = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    solo[1, 0] = True
    blend = BlendScorer(base=QFilterScorer(torch.randn(n_layers, n_heads, dim).double()),
                        weights=torch.full((n_layers, n_heads), 0.5), solo=solo)
    ids = torch.randint(4, 90, (2, 64), generator=torch.Generator().manual_seed(1))
    policy = EvictionPolicy(blend, 20, 4, n_sinks=4)
    fast, slow = perplexity(model, ids, policy), perplexity_reference(model, ids, policy)
    assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9


def _table(n_layers: int, n_heads: int) -> tuple[tuple[float, ...], ...]:
    """Needle attention peaking at the last layer's last head, then layer 0's first."""
    rows = [[0.01 * (i + h) for h in range(n_heads)] for i in range(n_layers)]
    rows[-1][-1], rows[0][0] = 0.9, 0.8
    return tuple(tuple(r) for r in rows)


def _spread(n_layers: int, n_heads: int) -> dict:
    return {"qfilters": tuple(tuple(2.0 for _ in range(n_heads)) for _ in range(n_layers)),
            "content-novelty": tuple(tuple(0.5 for _ in range(n_heads)) for _ in range(n_layers))}


def _ranker(cache: QFiltersCache, layer: int = 0):
    """(the layer's ranker, the blend's solo heads) of a cache built from a recipe."""
    scorer = cache.layers[layer].policy.scorer
    return scorer, (scorer.inner if isinstance(scorer, AgedScorer) else scorer).solo


def test_a_recall_recipe_travels_with_its_table_and_the_cache_switches_those_heads(tiny_llama, tmp_path) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    recipe = Recipe("qfilters", 0.25, 0, "uniform", novelty_scorer="content-novelty", recall_heads=1,
                    recency_weight=0.5)
    book = RecipeBook({32: recipe}, score_spread=_spread(n_layers, n_heads),
                      needle_attention=_table(n_layers, n_heads))
    path = QFilters(torch.randn(n_layers, n_heads, dim)).with_recipe(book).save_pretrained(tmp_path / "f")
    meta = json.loads((path / "qfilters.json").read_text())
    assert meta["format_version"] == 2 and meta["recipe"]["by_budget"]["32"]["recall_heads"] == 1
    assert meta["recipe"]["needle_attention"][-1][-1] == 0.9
    loaded = QFilters.from_pretrained(path)
    assert loaded.recipe == book
    scorer, solo = _ranker(QFiltersCache(tiny_llama.model, loaded, budget=32))
    assert solo.nonzero().tolist() == [[n_layers - 1, n_heads - 1]]  # the head reading the needle most
    # its age discount is counted in novelty's spread, the others' in the base's
    assert scorer.rates[-1, -1] == pytest.approx(0.5 * 0.5 / 32) and scorer.rates[0, 0] == pytest.approx(0.5 * 2 / 32)
    # a novelty layer is novelty already: the recall head goes to the best head of the other layers
    halved = RecipeBook({32: replace(recipe, novelty_layers=0.5)}, score_spread=_spread(n_layers, n_heads),
                        needle_attention=_table(n_layers, n_heads))
    _, solo = _ranker(QFiltersCache(tiny_llama.model, loaded.with_recipe(halved), budget=32))
    assert solo.nonzero().tolist() == [[0, 0]]
    assert "recall=1" in recipe.label and "recall heads" in recipe.describe()
    assert "recall_heads" not in Recipe("qfilters").to_dict()  # the default stays out: older readers


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("needle_attention"), "no needle attention is stored"),
    (lambda r: r.update(needle_attention=[[0.1], [0.1, 0.2]]), "needle_attention"),
    (lambda r: r.update(needle_attention=[[-0.1, 0.2], [0.1, 0.2]]), "needle_attention"),
    (lambda r: r.update(needle_attention="heads"), "needle_attention"),
    (lambda r: r["by_budget"]["32"].update(recall_heads=-1), "non-negative"),
    (lambda r: r["by_budget"]["32"].update(recall_heads=1.5), "wrong type"),
    (lambda r: r["by_budget"]["32"].update(recall_heads=True), "wrong type"),
])
def test_a_malformed_recall_recipe_is_refused_with_the_reason(tmp_path, change, message) -> None:
    book = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", recall_heads=1)}, needle_attention=_table(2, 2))
    QFilters(torch.randn(2, 2, 16)).with_recipe(book).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "qfilters.json").read_text())
    change(meta["recipe"])
    (tmp_path / "qfilters.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message):
        QFilters.from_pretrained(tmp_path)


def test_more_recall_heads_than_the_model_has_or_a_table_for_another_model_is_refused(tiny_llama) -> None:
    n_layers, n_heads, dim = tiny_llama.info.filter_shape
    filters = QFilters(torch.randn(n_layers, n_heads, dim))
    short = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", recall_heads=1)},
                       needle_attention=_table(n_layers - 1, n_heads))
    with pytest.raises(Exception, match="was it measured on this model"):
        QFiltersCache(tiny_llama.model, filters.with_recipe(short), budget=32)
    many = RecipeBook({32: Recipe("qfilters", 0.25, 0, "uniform", recall_heads=99)},
                      needle_attention=_table(n_layers, n_heads))
    _, solo = _ranker(QFiltersCache(tiny_llama.model, filters.with_recipe(many), budget=32))
    assert bool(solo.all())  # capped at every head it may switch
    with pytest.raises(ValueError, match="recall heads switch heads"):
        Recipe("novelty", recall_heads=1)
