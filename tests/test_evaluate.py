"""One-pass perplexity under eviction == token-by-token decoding with QFiltersCache; policy comparison API.

Equivalence runs in float64: the closed form is exact, but in float32 a near-tie between two key scores (1e-6
apart) can be broken differently by the batched and the one-token kernels, and a different eviction then moves the
perplexity by ~1e-3 (that is rounding, not the evaluator; see qfilters/evaluate.py). float64 removes such flips.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from eviction_reference import mask_from_horizon

from qfilters.evaluate import EvalResult, encode_document, evaluate_policies, perplexity, perplexity_reference
from qfilters.eviction import eviction_horizon
from qfilters.onepass import evicted_attention
from qfilters.policy import EvictionPolicy
from qfilters.scorers import KNormScorer, QFilterScorer, RandomScorer, Scorer, StreamingLLMScorer


class PerRowScorer(Scorer):
    """Batch row i is scored by scorers[i // rows_per_scorer]: several policies share one decoding loop."""

    name = "per-row"

    def __init__(self, scorers: list[Scorer], rows_per_scorer: int) -> None:
        self.scorers, self.rows = scorers, rows_per_scorer

    def score(self, keys, layer_idx, positions):
        return torch.cat([s.score(keys[i * self.rows : (i + 1) * self.rows], layer_idx, positions)
                          for i, s in enumerate(self.scorers)])


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1)


TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
    "property of some one or other of their daughters. My dear Mr. Bennet, said his lady to him one day, have you "
    "heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, returned she; for "
    "Mrs. Long has just been here, and she told me all about it. Mr. Bennet made no answer. Do you not want to "
    "know who has taken it? cried his wife impatiently. You want to tell me, and I have no objection to hearing it."
)


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token decoding is many tiny ops: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    return copy.deepcopy(smollm2.model).to(torch.float64)


@pytest.mark.slow
def test_one_pass_equals_token_by_token_on_smollm2(smollm2, smollm2_f64) -> None:
    """knorm, streamingllm, random and Q-Filters (random filters) on real text, T=192, budget 64, window 16.

    The four policies run as four rows of one batch (PerRowScorer): one decoding loop instead of four.
    """
    length, budget, window = 192, 64, 16
    seq = torch.tensor([encode_document(smollm2.tokenizer, TEXT * 3, length)])  # [1, T]
    scorers = [KNormScorer(), StreamingLLMScorer(n_sinks=4), RandomScorer(seed=1),
               QFilterScorer(torch.randn(30, 3, 64, generator=torch.Generator().manual_seed(2)))]
    batch = seq.repeat(len(scorers), 1)  # [4, T]: row i uses scorer i
    scorer = PerRowScorer(scorers, rows_per_scorer=1)
    fast = perplexity(smollm2_f64, batch, EvictionPolicy(scorer, budget, window), score_last=128)
    slow = perplexity_reference(smollm2_f64, batch, EvictionPolicy(scorer, budget, window), score_last=128)
    assert fast.n_tokens == slow.n_tokens == 4 * 128
    for i, (a, b) in enumerate(zip(fast.per_sequence_perplexity, slow.per_sequence_perplexity, strict=True)):
        assert _rel(a, b) < 1e-4, (type(scorers[i]).__name__, a, b)
    full = perplexity(smollm2_f64, seq, None, score_last=128)
    assert all(_rel(a, full.perplexity) > 1e-3 for a in fast.per_sequence_perplexity)  # eviction really happened
    # a policy alone (batch of 1, no PerRowScorer) gives the same as its row in the batch
    alone = perplexity(smollm2_f64, seq, EvictionPolicy(scorers[3], budget, window), score_last=128)
    assert _rel(alone.perplexity, fast.per_sequence_perplexity[3]) < 1e-9


@pytest.mark.slow
def test_one_pass_equals_token_by_token_on_gemma3_with_sliding_layers(gemma3) -> None:
    """Gemma-3: QK-norm, 1 KV head for 4 query heads, sliding layers (window shrunk to 24 so it matters at T=96)."""
    model = copy.deepcopy(gemma3.model).to(torch.float64)
    model.config.sliding_window = 24
    ids = torch.tensor([encode_document(gemma3.tokenizer, TEXT * 2, 96)])
    scorer = QFilterScorer(torch.randn(18, 1, 256, generator=torch.Generator().manual_seed(0)))
    fast = perplexity(model, ids, EvictionPolicy(scorer, 40, 8), score_last=16)
    slow = perplexity_reference(model, ids, EvictionPolicy(scorer, 40, 8), score_last=16)
    assert _rel(fast.perplexity, slow.perplexity) < 1e-4
    model.config.sliding_window = 512  # the shrunk window was really in force (in both paths)
    assert _rel(perplexity(model, ids, EvictionPolicy(scorer, 40, 8), score_last=16).perplexity, fast.perplexity) > 1e-6


def _sdpa(module, q, k, v, mask, **kwargs):  # stands in for transformers' kernel: GQA repeat, [B, T, H, D] out
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2), None


@pytest.mark.parametrize("block", [1, 7, 16, 64])
@pytest.mark.parametrize("given", ["none", "bool", "float"])
def test_blockwise_attention_equals_dense_masked_attention(block, given) -> None:
    gen = torch.Generator().manual_seed(block)
    batch, q_heads, kv_heads, length, dim = 2, 6, 3, 50, 8
    q = torch.randn(batch, q_heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    horizon = eviction_horizon(torch.randint(0, 5, (batch, kv_heads, length), generator=gen).float(), 9, 4)
    dense = mask_from_horizon(horizon.repeat_interleave(2, dim=1))  # [B, Hq, T, T]
    given_mask = None
    if given != "none":  # e.g. a padding mask: batch row 1 must not see its first 5 keys
        allowed = torch.ones(batch, 1, length, length, dtype=torch.bool)
        allowed[1, :, 5:, :5] = False
        dense = dense & allowed
        given_mask = allowed if given == "bool" else torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
            ~allowed, torch.finfo(torch.float64).min)
    expected, _ = _sdpa(None, q, k, v, dense)
    got, _ = evicted_attention(None, q, k, v, given_mask, horizon, _sdpa, block)
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("n_sinks,uncompressed", [(0, ()), (3, ()), (2, (1,)), (0, (0, 1))])
def test_one_pass_equals_token_by_token_on_tiny_llama(tiny_llama, n_sinks, uncompressed) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    ids = torch.randint(4, 90, (3, 80), generator=torch.Generator().manual_seed(n_sinks))
    scorer = QFilterScorer(torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(1)))
    policy = EvictionPolicy(scorer, 24, 6, n_sinks=n_sinks, uncompressed_layers=uncompressed)
    fast = perplexity(model, ids, policy)
    slow = perplexity_reference(model, ids, policy)
    for a, b in zip(fast.per_sequence_perplexity, slow.per_sequence_perplexity, strict=True):
        assert _rel(a, b) < 1e-9
    full = perplexity(model, ids, None)
    assert (_rel(fast.perplexity, full.perplexity) < 1e-12) == (uncompressed == (0, 1))


def test_budget_covering_the_sequence_is_exactly_full_cache(tiny_llama) -> None:
    model = tiny_llama.model
    ids = torch.randint(4, 90, (2, 40), generator=torch.Generator().manual_seed(0))
    full = perplexity(model, ids, None, score_last=20)
    assert perplexity(model, ids, EvictionPolicy(KNormScorer(), 40, 8), score_last=20).nll_sum == full.nll_sum
    evicting = perplexity(model, ids, EvictionPolicy(KNormScorer(), 16, 8), score_last=20)
    assert evicting.nll_sum != full.nll_sum  # eviction is on
    ref = perplexity_reference(model, ids, None, score_last=20)  # DynamicCache token by token
    assert _rel(ref.perplexity, full.perplexity) < 1e-5


def test_one_layer_storing_the_whole_sequence_does_not_switch_eviction_off_in_the_others(tiny_llama) -> None:
    """A per-layer policy (a sensitivity allocation gives one layer most of the memory) evicts wherever some layer's
    budget is below the length: the full-cache shortcut is for sequences that fit every layer."""
    from qfilters.policy import LayerwisePolicy

    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    ids = torch.randint(4, 90, (2, 40), generator=torch.Generator().manual_seed(5))
    policy = LayerwisePolicy({0: EvictionPolicy(KNormScorer(), 64, 8), 1: EvictionPolicy(KNormScorer(), 12, 4)})
    fast = perplexity(model, ids, policy, score_last=20)
    slow = perplexity_reference(model, ids, policy, score_last=20)
    assert _rel(fast.perplexity, slow.perplexity) < 1e-9
    assert fast.nll_sum != perplexity(model, ids, None, score_last=20).nll_sum
    fits = LayerwisePolicy({0: EvictionPolicy(KNormScorer(), 64, 8), 1: EvictionPolicy(KNormScorer(), 40, 4)})
    assert perplexity(model, ids, fits, score_last=20).nll_sum == perplexity(model, ids, None, score_last=20).nll_sum


def test_score_last_selects_the_tail(tiny_llama) -> None:
    model = tiny_llama.model
    ids = torch.randint(4, 90, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits[0].double()  # [T, V]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    res = perplexity(model, ids, None, score_last=10)
    assert res.n_tokens == 10 and abs(res.nll_sum - float(nll[-10:].sum())) < 1e-3
    assert perplexity(model, ids, None).n_tokens == 29
    for bad in (0, 30, 2.5):
        with pytest.raises(ValueError, match="score_last"):
            perplexity(model, ids, None, score_last=bad)
    with pytest.raises(ValueError, match="must exceed window"):
        perplexity(model, ids, EvictionPolicy(KNormScorer(), 8, 8))


@pytest.mark.slow
def test_encode_document_bos_rule(smollm2, gemma3) -> None:
    long_text = TEXT * 40
    ids = encode_document(smollm2.tokenizer, long_text, 300)
    assert len(ids) == 300 and ids[0] == smollm2.tokenizer.bos_token_id
    assert ids[1:] == smollm2.tokenizer(long_text)["input_ids"][:299]  # prefix tokenization = whole tokenization
    g = encode_document(gemma3.tokenizer, long_text, 50)
    assert g[0] == gemma3.tokenizer.bos_token_id and g[1] != g[0]  # Gemma adds <bos> itself: not doubled
    assert len(encode_document(smollm2.tokenizer, "short text", 300)) < 300


@pytest.mark.slow
def test_evaluate_policies_rows_table_json_and_plot(smollm2, artifacts_dir) -> None:
    from rich.console import Console

    from qfilters.plots import plot_perplexity_vs_budget

    docs = [SimpleNamespace(title=f"doc{i}", text=TEXT[i * 40 :] + TEXT) for i in range(2)]
    docs.insert(1, SimpleNamespace(title="too short", text="Hello."))
    corpus = SimpleNamespace(documents=docs, spec="test:austen-like", sha256="0" * 64)
    filters = torch.randn(30, 3, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(budgets=[40, 80], window=16, seq_len=128, score_last=48, progress=False, model_id="smollm2")
    result = evaluate_policies(smollm2.model, smollm2.tokenizer, corpus, filters, **kw)
    assert isinstance(result, EvalResult)
    assert result.titles == ["doc0", "doc1"] and result.skipped == ["too short"]
    assert result.policies == ["qfilters", "knorm", "streamingllm"] and result.budgets == [40, 80]
    rows = {(r.policy, r.budget): r for r in result.rows}
    assert len(rows) == 8 and rows["full", 40].gap == 0.0
    for row in rows.values():
        assert abs(row.gap - (row.perplexity - result.full_perplexity)) < 1e-9
    # pooled numbers are the per-document perplexity() numbers, pooled
    ids = [torch.tensor([encode_document(smollm2.tokenizer, d.text, 128)]) for d in (docs[0], docs[2])]
    streaming = EvictionPolicy(StreamingLLMScorer(n_sinks=4), 40, 16)
    direct = [perplexity(smollm2.model, x, streaming, score_last=48) for x in ids]
    pooled = sum(r.nll_sum for r in direct) / 96
    assert abs(result.perplexity("streamingllm", 40) - math.exp(pooled)) < 1e-9
    ratio = result.gap_ratio("qfilters", "streamingllm", 40)
    assert abs(ratio - result.gap("qfilters", 40) / result.gap("streamingllm", 40)) < 1e-12

    record = result.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["documents_evaluated"] == 2 and record["tokens_scored_per_policy"] == 96
    assert record["config"]["model"] == "smollm2"
    assert record["documents"][1]["title"] == "doc1" and set(record["documents"][1]["perplexity"]) == {
        "qfilters", "knorm", "streamingllm"}
    again = evaluate_policies(smollm2.model, smollm2.tokenizer, corpus, filters, **kw)
    assert json.dumps(again.to_dict()) == json.dumps(record)  # deterministic

    console = Console(record=True, width=140)
    console.print(result.table())
    text = console.export_text()
    assert "budget 40" in text and "streamingllm" in text and "gap QF / gap StreamingLLM" in text
    path = plot_perplexity_vs_budget(result, artifacts_dir / "eval_plot_test.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_policies_rejects_bad_arguments(tiny_llama) -> None:
    corpus = SimpleNamespace(documents=[SimpleNamespace(title="a", text="abc " * 100)])
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    with pytest.raises(ValueError, match="unknown policies"):
        evaluate_policies(model, tok, corpus, None, budgets=[32], window=8, policies=("full", "h2o"), progress=False)
    with pytest.raises(ValueError, match="needs filters"):
        evaluate_policies(model, tok, corpus, None, budgets=[32], window=8, progress=False)
    with pytest.raises(ValueError, match="no document"):
        evaluate_policies(model, tok, corpus, None, budgets=[32], window=8, seq_len=4096, score_last=64,
                          policies=("full", "knorm"), progress=False)
    res = evaluate_policies(model, tok, corpus, None, budgets=[32], window=8, seq_len=200, score_last=50,
                            policies=("full", "knorm", "random"), progress=False)
    assert res.policies == ["knorm", "random"] and res.gap_ratio("knorm", "knorm", 32) == pytest.approx(1.0)


def test_one_pass_refuses_kernels_that_take_no_mask(tiny_llama) -> None:
    from qfilters.errors import ModelError

    model = copy.deepcopy(tiny_llama.model)
    model.config._attn_implementation = "flash_attention_2"  # not installed here: only the check is exercised
    ids = torch.randint(4, 90, (1, 40))
    with pytest.raises(ModelError, match="attn_implementation 'sdpa'"):
        perplexity(model, ids, EvictionPolicy(KNormScorer(), 16, 4))


def test_progress_bars_go_to_stderr_so_stdout_stays_machine_readable(tiny_llama, capsys) -> None:
    """`qfilters eval --json > out.json` must give valid JSON: the bars were once written into stdout."""
    from tests.test_validation import _corpus

    evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, _corpus(3), None, budgets=[48], window=12, seq_len=128,
                      score_last=64, max_docs=1, policies=["full", "knorm"], progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "knorm @ 48" in err
