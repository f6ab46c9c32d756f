"""QFiltersCache: the eviction policy step by step (against the closed form), and generate() on real models."""

from __future__ import annotations

import copy

import pytest
import torch
from eviction_reference import TableScorer, simulate_visibility, stored_lengths, visibility_mask
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from qfilters.architecture import layer_kinds
from qfilters.cache import EvictingLayer, QFiltersCache, cache_kwargs
from qfilters.errors import ShapeMismatchError
from qfilters.eviction import _kth_beater_dense, _kth_beater_sweep, prepare_scores
from qfilters.policy import EvictionPolicy, check_budget
from qfilters.scorers import KNormScorer, QFilterScorer, StreamingLLMScorer


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding is many tiny ops: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_case(gen: torch.Generator) -> tuple[torch.Tensor, int, int, int]:
    length = int(torch.randint(1, 48, (1,), generator=gen))
    window = int(torch.randint(0, 6, (1,), generator=gen))
    n_sinks = int(torch.randint(0, 3, (1,), generator=gen))
    budget = window + n_sinks + int(torch.randint(1, 8, (1,), generator=gen))
    if int(torch.randint(0, 2, (1,), generator=gen)):
        table = torch.randint(0, 4, (2, 3, length), generator=gen).float()  # many ties
    else:
        table = torch.randn(2, 3, length, generator=gen)
    return table, budget, window, n_sinks


def _visible_by_decoding(table: torch.Tensor, budget: int, window: int, n_sinks: int, chunks: list[int]):
    """Drive an EvictingLayer; keys carry their position in channel 0 so the returned keys reveal what is seen."""
    batch, heads, length = table.shape
    layer = EvictingLayer(0, EvictionPolicy(TableScorer(table), budget, window, n_sinks))
    vis = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    start = 0
    for size in chunks:
        pos = torch.arange(start, start + size, dtype=torch.float32)
        keys = pos[None, None, :, None].expand(batch, heads, size, 2).contiguous()  # [B, H, n, 2]
        seen, _ = layer.update(keys, keys.clone())
        seen_pos = seen[..., 0].long()  # [B, H, stored + n]
        for t in range(start, start + size):  # within a chunk, the causal mask hides later new keys
            for b in range(batch):
                for h in range(heads):
                    vis[b, h, t, seen_pos[b, h][seen_pos[b, h] <= t]] = True
        assert layer.get_seq_length() == start + size
        assert layer.stored_length == min(start + size, budget)
        assert torch.equal(layer.positions, layer.keys[..., 0].long())  # positions tracked with the keys
        assert (layer.positions.diff(dim=-1) > 0).all()  # kept in position order
        start += size
    return vis, layer


def test_closed_form_matches_brute_force_and_the_cache_step_by_step() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        table, budget, window, n_sinks = _random_case(gen)
        length = table.shape[-1]
        scores = prepare_scores(table, torch.arange(length), n_sinks)
        closed = visibility_mask(scores, budget, window)
        assert torch.equal(closed, simulate_visibility(scores, budget, window))
        by_cache, _ = _visible_by_decoding(table, budget, window, n_sinks, [1] * length)
        assert torch.equal(closed, by_cache), (budget, window, n_sinks, table)


def test_cpu_sweep_and_dense_kth_beater_agree() -> None:
    """The evaluator uses the heap sweep on CPU and the dense count on GPUs: same e(j), ties and infinities included."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(100):
        table, budget, window, n_sinks = _random_case(gen)
        scores = prepare_scores(table, torch.arange(table.shape[-1]), n_sinks)
        scores[0, 0, ::3] = float("-inf")
        k = budget - window
        assert torch.equal(_kth_beater_sweep(scores, k), _kth_beater_dense(scores, k))


def test_visibility_before_the_cache_is_full_and_when_budget_covers_everything() -> None:
    scores = torch.randn(1, 2, 20)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    assert torch.equal(visibility_mask(scores, 20, 4)[0, 0], causal)  # never more than budget stored: no eviction
    vis = visibility_mask(scores, 8, 4)
    assert torch.equal(vis[..., :9, :], causal[:9].expand(1, 2, 9, 20))  # t <= budget: everything visible
    assert not torch.equal(vis[..., 9, :], causal[9].expand(1, 2, 20))  # step 9 sees budget + 1 of 10 keys
    assert (vis.sum(dim=-1)[..., 8:] == 9).all()  # stored budget + the new key


def test_sinks_and_window_are_always_kept() -> None:
    table = torch.randn(1, 2, 40)
    _, layer = _visible_by_decoding(table, 12, 4, 3, [1] * 40)
    for h in range(2):
        pos = layer.positions[0, h].tolist()
        assert pos[:3] == [0, 1, 2] and pos[-4:] == [36, 37, 38, 39]


def test_chunked_prefill_then_decoding_stores_the_same_positions() -> None:
    """A long prefill evicts once; with static scores the kept set equals the one of token-by-token decoding."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        table, budget, window, n_sinks = _random_case(gen)
        length = table.shape[-1]
        cut = int(torch.randint(1, length + 1, (1,), generator=gen))
        _, stepwise = _visible_by_decoding(table, budget, window, n_sinks, [1] * length)
        _, chunked = _visible_by_decoding(table, budget, window, n_sinks, [cut] + [1] * (length - cut))
        assert torch.equal(stepwise.positions, chunked.positions)


def test_prefill_returns_everything_and_mask_sizes_follow_the_true_sequence() -> None:
    table = torch.randn(1, 1, 30)
    layer = EvictingLayer(0, EvictionPolicy(TableScorer(table), budget=8, window=2))
    keys = torch.randn(1, 1, 20, 4)
    k, v = layer.update(keys, keys)
    assert k.shape[2] == 20 and torch.equal(k, keys)  # the prompt attends to itself in full
    assert layer.stored_length == 8 and layer.get_seq_length() == 20
    assert layer.get_mask_sizes(1) == (9, 12)  # 8 stored + 1 new; offset = seen - stored
    with pytest.raises(NotImplementedError):
        layer.crop(-1)


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="must exceed window"):
        check_budget(64, 64)
    with pytest.raises(ValueError, match="must exceed window"):
        check_budget(68, 64, n_sinks=4)
    with pytest.raises(ValueError, match="non-negative integer"):
        check_budget(64.0, 8)  # type: ignore[arg-type]
    check_budget(69, 64, 4)


def test_batch_helpers_move_scores_and_positions_with_the_keys() -> None:
    layer = EvictingLayer(0, EvictionPolicy(KNormScorer(), budget=6, window=2))
    keys = torch.randn(2, 1, 10, 4)
    layer.update(keys, keys)
    before = layer.positions.clone()
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4 and torch.equal(layer.positions[1], before[0])
    layer.batch_select_indices(torch.tensor([3]))
    assert layer.scores.shape == (1, 1, 6) and torch.equal(layer.positions[0], before[1])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.stored_length == 0


# ---------------------------------------------------------------------------------------------- real models
def _prompt(tokenizer, n_repeats: int = 10):
    text = ("Elizabeth walked to Netherfield through the wet fields, and arrived with her stockings dirty and "
            "her face glowing with the warmth of exercise. ") * n_repeats
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.slow
def test_generate_with_small_budget_keeps_budget_and_changes_output(smollm2) -> None:
    model, ids = smollm2.model, _prompt(smollm2.tokenizer)
    assert ids.shape[1] > 200
    new = 12
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=new, do_sample=False)
        cache = QFiltersCache(model, QFilterScorer(torch.randn(30, 3, 64)), budget=64, window=16)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=new, do_sample=False)
    total = ids.shape[1] + new - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == total
    assert stored_lengths(cache) == [64] * 30
    assert all(isinstance(layer, EvictingLayer) for layer in cache.layers)
    assert out.shape == ref.shape and not torch.equal(out, ref)


@pytest.mark.slow
def test_generate_with_budget_covering_everything_equals_default_cache(smollm2) -> None:
    model = smollm2.model
    ids = _prompt(smollm2.tokenizer, 3)
    ids = torch.cat([ids, ids.flip(1)])  # batch of 2, no padding
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        cache = QFiltersCache(model, KNormScorer(), budget=ids.shape[1] + 10, window=16)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                             max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_streamingllm_positions_and_uncompressed_layers(smollm2) -> None:
    model, ids = smollm2.model, _prompt(smollm2.tokenizer, 4)
    with torch.inference_mode():
        cache = QFiltersCache(model, StreamingLLMScorer(n_sinks=4), budget=32, window=8, uncompressed_layers=(0, 7))
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False)
    seen = cache.get_seq_length()
    assert isinstance(cache.layers[0], DynamicLayer) and not isinstance(cache.layers[0], EvictingLayer)
    lengths = stored_lengths(cache)
    assert lengths[0] == lengths[7] == seen and lengths[1] == 32
    expected = list(range(4)) + list(range(seen - 28, seen))  # sinks + most recent
    assert cache.layers[3].positions[0, 2].tolist() == expected


def test_shape_mismatch_between_filters_and_model(tiny_llama) -> None:
    with pytest.raises(ShapeMismatchError, match=r"\(30, 3, 64\).*\(2, 2, 16\)"):
        QFiltersCache(tiny_llama.model, QFilterScorer(torch.randn(30, 3, 64)), budget=32, window=8)
    with pytest.raises(ValueError, match="out of range"):
        QFiltersCache(tiny_llama.model, KNormScorer(), budget=32, window=8, uncompressed_layers=(2,))


@pytest.mark.slow
def test_gemma3_sliding_layers_keep_transformers_layers(gemma3) -> None:
    model = gemma3.model
    kinds = layer_kinds(model)
    assert [i for i, k in enumerate(kinds) if k == "compress"] == [5, 11, 17]
    ids = _prompt(gemma3.tokenizer, 3)
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
        full = QFiltersCache(model, QFilterScorer(torch.randn(18, 1, 256)), budget=ids.shape[1] + 8, window=16)
        same = model.generate(ids, **cache_kwargs(model, full), max_new_tokens=6, do_sample=False)
        small = QFiltersCache(model, QFilterScorer(torch.randn(18, 1, 256)), budget=40, window=8)
        model.generate(ids, **cache_kwargs(model, small), max_new_tokens=6, do_sample=False)
    assert torch.equal(same, ref)
    assert isinstance(small.layers[0], DynamicSlidingWindowLayer)
    assert [stored_lengths(small)[i] for i in (5, 11, 17)] == [40, 40, 40]
    assert small.get_seq_length() == ids.shape[1] + 5


def test_tiny_model_generate_batch(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model)
    ids = torch.randint(4, 90, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = QFiltersCache(model, KNormScorer(), budget=20, window=4, n_sinks=2)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                             max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 55) and stored_lengths(cache) == [20, 20]
    assert (cache.layers[1].positions[..., :2] == torch.tensor([0, 1])).all()
