"""The novelty scorer: causal (reads earlier keys through a running sum), so the cache carries its state and the
one-pass evaluator must still equal token-by-token decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from qfilters.cache import QFiltersCache, cache_kwargs
from qfilters.errors import ShapeMismatchError
from qfilters.evaluate import perplexity, perplexity_reference
from qfilters.passkey import standard_policies
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.scorers import NoveltyScorer, make_scorer


def _keys(batch: int = 2, heads: int = 3, length: int = 50, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(seed))


def test_a_key_unlike_the_text_so_far_scores_highest() -> None:
    keys = _keys(batch=1, heads=1, length=40)
    keys[..., :, 0] += 5.0  # the text: keys share one dominant direction
    keys[0, 0, 30] = torch.tensor([-5.0, 0, 0, 0, 0, 0, 0, 1.0])  # a one-off fact points the other way
    scores = make_scorer("novelty").score(keys, 0, torch.arange(40))
    assert scores.dtype == torch.float32 and scores.shape == (1, 1, 40)
    assert int(scores[0, 0, 4:].argmax()) + 4 == 30


def test_the_first_keys_are_sinks_not_the_least_novel() -> None:
    """Key 0 is its own running sum (the lowest possible score) but it is the attention sink: forced kept."""
    keys, positions = _keys(length=10), torch.arange(10)
    assert torch.isinf(NoveltyScorer().score(keys, 0, positions)[..., :4]).all()
    bare = NoveltyScorer(n_sinks=0).score(keys, 0, positions)
    assert torch.allclose(bare[..., 0], torch.tensor(-1.0)) and bool((bare[..., 0] <= bare.min(dim=-1).values).all())
    assert make_scorer("novelty", n_sinks=0).n_sinks == 4  # its own sinks, not StreamingLLM's setting
    with pytest.raises(ValueError, match="n_sinks"):
        NoveltyScorer(n_sinks=-1)


def test_streaming_in_pieces_equals_scoring_the_whole_sequence() -> None:
    scorer, keys = NoveltyScorer(), _keys()
    whole = scorer.score(keys, 0, torch.arange(50))
    pieces, state = [], None
    for a, b in ((0, 7), (7, 8), (8, 8), (8, 31), (31, 50)):
        part, state = scorer.score_stream(keys[:, :, a:b], 0, torch.arange(a, b), state)
        pieces.append(part)
    assert torch.equal(torch.cat(pieces, dim=-1), whole)
    # a key's score never depends on later keys
    later = keys.clone()
    later[:, :, 30:] = torch.randn_like(later[:, :, 30:])
    assert torch.equal(scorer.score(later, 0, torch.arange(50))[..., :30], whole[..., :30])
    with pytest.raises(ShapeMismatchError, match="novelty state"):
        scorer.score_stream(keys, 0, torch.arange(50), torch.zeros(2, 3, 9, dtype=torch.float64))


def test_one_pass_evaluation_is_exact_against_the_cache(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    ids = torch.randint(4, 90, (2, 64), generator=torch.Generator().manual_seed(1))
    for policy in (EvictionPolicy(NoveltyScorer(), 20, 4, n_sinks=2),
                   LayerwisePolicy({1: EvictionPolicy(NoveltyScorer(), 12, 2)})):
        fast, slow = perplexity(model, ids, policy), perplexity_reference(model, ids, policy)
        assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9


def test_the_cache_carries_the_running_sum_through_beams_and_resets(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    ids = torch.randint(4, 90, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = QFiltersCache(model, NoveltyScorer(), budget=12, window=4)
    with torch.inference_mode():
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False, num_beams=2)
    layer = cache.layers[0]
    assert layer.score_state is not None and layer.score_state.shape == (2, 2, 16)  # beams, KV heads, head dim
    cache.reset()
    assert layer.score_state is None


def test_passkey_reports_novelty_beside_the_other_scorers(tiny_llama) -> None:
    policies = standard_policies(tiny_llama.model, [16, 32], window=8)
    assert isinstance(policies["novelty@16"], LayerwisePolicy)
    assert isinstance(policies["novelty@32"].for_layer(0).scorer, NoveltyScorer)
