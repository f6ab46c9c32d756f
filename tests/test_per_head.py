"""Per-head budgets: the KV heads of a layer keep different numbers of keys, at the memory they add up to.

What a user relies on: the cache stores each head's own budget (memory is the sum, not the widest head times the head
count), decoding with it gives exactly what the one-pass evaluator computes, the padding between heads is never
attended to, and a recipe that allocates by KV head travels in qfilters.json and is spent by the cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from eviction_reference import TableScorer, simulate_visibility

from qfilters import QFilters
from qfilters.attention import _pending_masks
from qfilters.cache import EvictingLayer, QFiltersCache, RaggedEvictingLayer, cache_kwargs
from qfilters.errors import ModelError
from qfilters.evaluate import perplexity, perplexity_reference
from qfilters.eviction import prepare_scores
from qfilters.passkey import _keep_static
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.recipes import Recipe, RecipeBook, allocate_heads, head_sensitivity
from qfilters.scorers import KNormScorer, QFilterScorer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    _pending_masks().clear()


def _f64(tiny_llama):
    return copy.deepcopy(tiny_llama.model).to(torch.float64)


def test_a_per_head_policy_is_checked_and_described() -> None:
    scorer = KNormScorer()
    policy = EvictionPolicy.per_head(scorer, [10, 30], [2, 8], n_sinks=1)
    assert (policy.budget, policy.window, policy.min_budget) == (30, 8, 10)  # the widest head's; the narrowest's
    assert policy.is_per_head and policy.stored_keys == 40
    assert policy.describe()["head_budgets"] == [10, 30]
    assert not EvictionPolicy.per_head(scorer, [16, 16], [4, 4]).is_per_head  # equal heads: the uniform path
    with pytest.raises(ValueError, match="window"):
        EvictionPolicy.per_head(scorer, [10, 30], [9, 8], n_sinks=1)  # head 0 has no slot left to choose
    with pytest.raises(ValueError, match="one budget and one window"):
        EvictionPolicy.per_head(scorer, [10, 30], [2])
    with pytest.raises(ValueError, match="widest head"):
        EvictionPolicy(scorer, 10, 2, 0, (), (10, 30), (2, 8))
    with pytest.raises(ValueError, match="KV heads"):
        policy.head_limits(3)


def _drive(layer: RaggedEvictingLayer, chunks: tuple[int, ...], batch: int, heads: int, length: int) -> torch.Tensor:
    """Feed positions (as keys) in ``chunks``; what each head attends to (padding excluded), [B, H, T, T]."""
    vis = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    start = 0
    for size in chunks:
        pos = torch.arange(start, start + size, dtype=torch.float64)
        keys = pos[None, None, :, None].expand(batch, heads, size, 2).contiguous()
        seen, _ = layer.update(keys, keys.clone())
        pending = _pending_masks().pop(0, None)  # offered only where some head is shorter than another
        valid = torch.ones(heads, seen.shape[2], dtype=torch.bool) if pending is None else pending[0]
        assert pending is None or (pending[1] is seen and not valid.all())
        for h in range(heads):
            seen_pos = seen[:, h, valid[h], 0].long()  # [B, stored_h + n]
            for t in range(start, start + size):
                for b in range(batch):
                    vis[b, h, t, seen_pos[b][seen_pos[b] <= t]] = True
        start += size
        assert layer.stored_per_head == [min(start, b) for b in layer.policy.head_budgets]
        assert layer.get_seq_length() == start and layer.stored_length == max(layer.stored_per_head)
        for h in range(heads):  # positions travel with the keys, in position order
            assert torch.equal(layer.head_positions[h], layer.head_keys[h][..., 0].long())
    assert start == length
    return vis


@pytest.mark.parametrize("seed", range(4))
def test_each_head_of_the_ragged_cache_follows_its_own_budget_step_by_step(seed: int) -> None:
    """Decoding token by token, what each head attends to is greedy eviction at that head's own budget, and what the
    one-pass closed form (policy.horizon) says; a chunked prefill ends holding the same keys."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, length = 2, 3, 40
    table = torch.randn(batch, heads, length, generator=gen)
    if seed % 2:
        table = table.round()  # ties
    budgets, windows, sinks = [6, 15, 9], [1, 4, 3], seed % 3
    policy = EvictionPolicy.per_head(TableScorer(table), budgets, windows, n_sinks=sinks)
    stepwise = RaggedEvictingLayer(0, policy)
    vis = _drive(stepwise, (5, *([1] * 35)), batch, heads, length)  # the prefill of 5 fits every head
    prepared = prepare_scores(table, torch.arange(length), sinks)
    expected = torch.cat([simulate_visibility(prepared[:, h:h + 1], b, w)
                          for h, (b, w) in enumerate(zip(budgets, windows, strict=True))], dim=1)
    assert torch.equal(vis, expected)
    horizon = policy.horizon(prepared)
    t = torch.arange(length)
    closed = (t[:, None] >= t[None, :]) & (t[None, None, :, None] <= horizon[:, :, None, :])
    assert torch.equal(closed, expected)
    chunked = RaggedEvictingLayer(0, policy)
    _drive(chunked, (5, 1, 7, 1, 1, 12, *([1] * 13)), batch, heads, length)
    for h in range(heads):
        assert torch.equal(chunked.head_positions[h], stepwise.head_positions[h])


def test_decoding_with_per_head_budgets_equals_the_one_pass_evaluator(tiny_llama) -> None:
    """The padding between heads never leaks into attention: token-by-token decoding through QFiltersCache (ragged
    storage, masked per head) gives the NLL the one-pass evaluator computes from the closed form."""
    model = _f64(tiny_llama)
    ids = torch.randint(4, 90, (2, 64), generator=torch.Generator().manual_seed(1))
    scorer = QFilterScorer(QFilters(torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(3))))
    for policy in (EvictionPolicy.per_head(scorer, [12, 30], [3, 6], n_sinks=2),
                   LayerwisePolicy({0: EvictionPolicy.per_head(KNormScorer(), [40, 10], [8, 2]),
                                    1: EvictionPolicy(scorer, 20, 4)})):
        fast, slow = perplexity(model, ids, policy), perplexity_reference(model, ids, policy)
        assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9
    wide = EvictionPolicy(scorer, 30, 6, n_sinks=2)  # and the per-head split is not the uniform policy in disguise
    assert perplexity(model, ids, wide).nll_sum != perplexity(model, ids, EvictionPolicy.per_head(
        scorer, [12, 30], [3, 6], n_sinks=2)).nll_sum


def test_generate_stores_the_sum_of_the_head_budgets(tiny_llama) -> None:
    model = _f64(tiny_llama)
    ids = torch.randint(4, 90, (2, 40), generator=torch.Generator().manual_seed(2))
    policy = EvictionPolicy.per_head(KNormScorer(), [8, 24], [2, 6])
    cache = QFiltersCache(model, policy)
    assert str(model.config._attn_implementation) == "qfilters+sdpa"  # routed: masks reach the attention
    with torch.inference_mode():
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 48)
    for layer in cache.layers:
        assert isinstance(layer, RaggedEvictingLayer)
        assert layer.stored_per_head == [8, 24]
        stored = sum(k.numel() + v.numel() for k, v in zip(layer.head_keys, layer.head_values, strict=True))
        assert stored == 2 * (8 + 24) * 2 * 16  # batch x (sum of budgets) x (keys + values) x head dim
    assert not _pending_masks()  # every offered mask was applied
    beams = QFiltersCache(model, policy)
    with torch.inference_mode():
        model.generate(ids[:1], **cache_kwargs(model, beams), max_new_tokens=4, do_sample=False, num_beams=2)
    assert beams.layers[0].head_keys[0].shape[0] == 2  # beams reordered head by head


def test_per_head_budgets_refuse_what_cannot_mask_per_head(tiny_llama) -> None:
    model = _f64(tiny_llama)
    policy = EvictionPolicy.per_head(KNormScorer(), [8, 24], [2, 6])
    with pytest.raises(TypeError, match="from the model"):
        QFiltersCache(model.config, policy)
    assert isinstance(QFiltersCache(model.config, EvictionPolicy(KNormScorer(), 24, 6)).layers[0], EvictingLayer)
    with pytest.raises(ValueError, match="KV heads"):
        QFiltersCache(model, EvictionPolicy.per_head(KNormScorer(), [8, 24, 16], [2, 6, 4]))
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ModelError, match="sdpa"):
        QFiltersCache(flash, policy)
    # the attention switched back behind the cache's back: the first step that would attend unmasked stops
    cache = QFiltersCache(model, policy)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(4, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), pytest.raises(ModelError, match="needs qfilters\\+sdpa"):
        model(ids, **cache_kwargs(model, cache), use_cache=True)
    assert not _pending_masks()
    eager = _f64(tiny_llama)
    eager.set_attn_implementation("eager")
    with pytest.raises(ModelError, match="recipe=None"):
        QFiltersCache(eager, policy)
    assert eager.config._attn_implementation == "eager"  # a cache that could not be built leaves the model as it was


def test_a_mask_left_behind_never_reaches_another_call(tiny_llama) -> None:
    """An aborted forward can leave a per-head mask pending: it is tied to the keys it was made for, so a later forward
    of the same layer (another cache, the one-pass evaluator) is untouched, and reset() withdraws it."""
    from qfilters.attention import offer_key_mask

    model = _f64(tiny_llama)
    ids = torch.randint(4, 90, (1, 20), generator=torch.Generator().manual_seed(5))
    policy = EvictionPolicy.per_head(KNormScorer(), [8, 16], [2, 4])
    cache = QFiltersCache(model, policy)  # routes the model through qfilters+sdpa
    with torch.inference_mode():
        clean = model(ids, use_cache=False).logits
        offer_key_mask(0, torch.zeros(2, 20, dtype=torch.bool), torch.zeros(1))  # stale: another tensor's mask
        assert torch.equal(model(ids, use_cache=False).logits, clean)
    assert not _pending_masks()
    layer = cache.layers[0]
    offer_key_mask(0, torch.zeros(2, 3, dtype=torch.bool), torch.zeros(1))
    layer.reset()
    assert not _pending_masks()


def test_chunks_onto_a_cache_with_layers_of_different_widths_stay_causal(tiny_llama) -> None:
    """transformers sizes one mask for all layers; under a per-head recipe each layer's widest head differs. A chunk
    of new tokens onto a filled cache must still see only earlier tokens: changing later tokens of the chunk changes
    nothing before them."""
    model = _f64(tiny_llama)
    policy = LayerwisePolicy({0: EvictionPolicy.per_head(KNormScorer(), [40, 10], [8, 2]),
                              1: EvictionPolicy.per_head(KNormScorer(), [12, 30], [3, 6])})
    gen = torch.Generator().manual_seed(6)
    prefix, chunk = torch.randint(4, 90, (1, 50), generator=gen), torch.randint(4, 90, (1, 10), generator=gen)
    other = chunk.clone()
    other[:, 5:] = torch.randint(4, 90, (1, 5), generator=gen)
    logits = []
    for tail in (chunk, other):
        cache = QFiltersCache(model, policy)
        with torch.inference_mode():
            model(prefix, **cache_kwargs(model, cache), use_cache=True)
            logits.append(model(tail, **cache_kwargs(model, cache), use_cache=True).logits)
    assert torch.equal(logits[0][:, :5], logits[1][:, :5])
    assert not torch.equal(logits[0][:, 5:], logits[1][:, 5:])


def test_passkey_keeps_each_heads_own_budget() -> None:
    keys = torch.randn(1, 3, 50, 8, generator=torch.Generator().manual_seed(0))
    policy = EvictionPolicy.per_head(KNormScorer(), [10, 30, 60], [2, 5, 5], n_sinks=1)
    keep = _keep_static(policy, keys, 0)
    assert keep.sum(dim=-1).tolist() == [[10, 30, 50]]
    assert keep[0, 0, -2:].all() and keep[0, 0, 0] and keep[0, 1, -5:].all()


def test_allocate_heads_splits_the_total_by_sensitivity_above_a_floor() -> None:
    table = [[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [0.0, 0.0]]  # 4 layers x 2 KV heads; layers 1 and 2 compressed
    budgets = allocate_heads(table, [1, 2], total=64, minimum=4)
    assert sum(map(sum, budgets)) == 64 * 2  # the memory of 64 keys per head index, over both heads
    assert min(map(min, budgets)) >= 4 + (128 - 16) // 8  # the uniform half is a floor under every head
    assert budgets[1][0] > budgets[0][0] > budgets[0][1]  # more to the heads that lose more when compressed
    with pytest.raises(ValueError, match="sensitivity"):
        allocate_heads(None, [1, 2], 64, 4)


def test_a_head_recipe_travels_in_qfilters_json_and_the_cache_spends_it(tiny_llama, tmp_path) -> None:
    from qfilters.architecture import compressed_layers

    layers = compressed_layers(tiny_llama.model)
    table = ((0.02, 0.0), (0.0, 0.05))
    book = RecipeBook({32: Recipe("qfilters", 0.25, 2, "head")}, head_sensitivity=table, context_length=128)
    filters = QFilters(torch.randn(*tiny_llama.info.filter_shape, generator=torch.Generator().manual_seed(2)))
    path = filters.with_recipe(book).save_pretrained(tmp_path / "f")
    meta = json.loads((path / "qfilters.json").read_text())
    assert meta["recipe"]["head_sensitivity"] == [list(r) for r in table]
    assert meta["format_version"] == 2  # older readers do not know the head allocation: they say "upgrade"
    loaded = QFilters.from_pretrained(path)
    assert loaded.recipe == book
    model = _f64(tiny_llama)
    cache = QFiltersCache(model, loaded, budget=32)
    policies = [layer.policy for layer in cache.layers]
    assert all(isinstance(layer, RaggedEvictingLayer) for layer in cache.layers)
    assert sum(p.stored_keys for p in policies) == 32 * len(layers) * 2  # the same memory as budget 32 everywhere
    assert policies[0].head_budgets[0] > policies[0].head_budgets[1]  # the sensitive heads got more
    assert policies[1].head_budgets[1] > policies[1].head_budgets[0]
    assert "KV-head sensitivity" in book.recipe_for(32).describe()
    with pytest.raises(ValueError, match="KV-head sensitivity"):
        RecipeBook({32: Recipe("qfilters", allocation="head")})
    with pytest.raises(ValueError, match="head_sensitivity"):
        RecipeBook.from_dict({"by_budget": {"32": {"scorer": "qfilters"}}, "head_sensitivity": [[1, "x"]]})
    with pytest.raises(ValueError, match="finite"):
        RecipeBook({32: Recipe("qfilters")}, head_sensitivity=((float("nan"), 0.0),))


def test_head_sensitivity_is_what_compressing_one_head_alone_costs(tiny_llama) -> None:
    model = _f64(tiny_llama)
    ids = torch.randint(4, 90, (1, 48), generator=torch.Generator().manual_seed(4))
    scorer = KNormScorer()
    table = head_sensitivity(model, ids, scorer, 12, 3, 24)
    assert len(table) == 2 and all(len(row) == 2 for row in table)
    full = perplexity(model, ids, None, 24).nll_sum
    alone = EvictionPolicy.per_head(scorer, [48, 12], [3, 3])
    nll = perplexity(model, ids, LayerwisePolicy({1: alone}), 24).nll_sum
    assert table[1][1] == pytest.approx((nll - full) / 24, rel=1e-9)
    assert any(x != 0 for row in table for x in row)
    assert head_sensitivity(model, ids, scorer, 48, 3, 24) == [[0.0, 0.0], [0.0, 0.0]]  # nothing evicted
