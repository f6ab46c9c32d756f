"""Per-layer eviction recipes (exact one-pass == decoding) and the passkey evaluation's compress-once protocol."""

from __future__ import annotations

import copy

import pytest
import torch

from qfilters.attention import attention_hook
from qfilters.cache import QFiltersCache, cache_kwargs
from qfilters.onepass import nll_result, perplexity
from qfilters.passkey import (
    PasskeyTrial,
    SnapKV,
    _keep_static,
    make_trials,
    run_passkey,
)
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.recipes import Recipe, allocate, layer_policies
from qfilters.scorers import KNormScorer, RandomScorer, StreamingLLMScorer


def test_allocations_spend_exactly_the_total() -> None:
    for alloc in ("uniform", "pyramid"):
        budgets = allocate(alloc, 64, 5, 6)
        assert sum(budgets) == 320 and min(budgets) >= 6
    assert allocate("pyramid", 64, 5, 6)[0] > allocate("pyramid", 64, 5, 6)[-1]
    sens = allocate("sensitivity", 64, 4, 6, sensitivity=[0.0, 3.0, 1.0, 0.0])
    assert sum(sens) == 256 and sens[1] > sens[2] > sens[0] == sens[3]
    with pytest.raises(ValueError, match="sensitivity"):
        allocate("sensitivity", 64, 4, 6)
    # keeping a layer whole is paid for at the sequence length
    pols = layer_policies(Recipe("knorm", 0.25, 2, "uniform", full_layers=1), KNormScorer(), 40, [0, 1, 2], 64)
    assert pols.layers[0] is None and pols.layers[1].budget + pols.layers[2].budget == 3 * 40 - 64
    with pytest.raises(ValueError, match="whole"):
        layer_policies(Recipe("knorm", full_layers=1), KNormScorer(), 20, [0, 1], 64)


def test_recipe_one_pass_equals_token_by_token_decoding(tiny_llama) -> None:
    """Different budget, window, sinks and scorer per layer: the closed form still holds layer by layer."""
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    ids = torch.randint(4, 90, (2, 64), generator=torch.Generator().manual_seed(2))
    policies = LayerwisePolicy({0: EvictionPolicy(KNormScorer(), 30, 8, 2),
                                1: EvictionPolicy(RandomScorer(seed=3), 18, 4, 0)})
    fast = perplexity(model, ids, policies, score_last=40)
    cache = QFiltersCache(model, policies)
    logits = []
    with torch.inference_mode():
        for t in range(63):
            out = model(ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
    slow = nll_result(torch.stack(logits[-40:], 1), ids[:, -40:])  # same NLL arithmetic as the evaluator
    assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9
    assert cache.layers[0].keys.shape[2] == 30 and cache.layers[1].keys.shape[2] == 18
    assert perplexity(model, ids, LayerwisePolicy(), score_last=40).nll_sum != fast.nll_sum


def _dense_reference(model, trial: PasskeyTrial, keep: dict[int, torch.Tensor]) -> torch.Tensor:
    """One forward over context + question + answer with an explicit mask: the context attends causally (full
    prefill), the tail sees only the kept context keys per head plus itself."""
    seq = torch.tensor([trial.context + trial.question + trial.answer])
    t_c, total = len(trial.context), seq.shape[1]

    def hook(module, query, key, value, attention_mask, base_fn, **kwargs):
        vis = torch.ones(total, total, dtype=torch.bool).tril().expand(1, key.shape[1], total, total).clone()
        if module.layer_idx in keep:
            vis[:, :, t_c:, :t_c] &= keep[module.layer_idx][:, :, None, :]
        rep = query.shape[1] // key.shape[1]
        mask = torch.zeros(vis.shape, dtype=query.dtype).masked_fill(~vis, torch.finfo(query.dtype).min)
        kwargs.pop("is_causal", None)
        return base_fn(module, query, key, value, mask.repeat_interleave(rep, 1), **kwargs)

    with torch.inference_mode(), attention_hook(model, hook):
        return model(seq).logits[0]


def test_passkey_compress_once_matches_a_dense_masked_forward(tiny_llama) -> None:
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    tok = tiny_llama.tokenizer
    filler = "It is a truth universally acknowledged, that a single man must be in want of a wife. " * 40
    trials = make_trials(tok, filler, 3, 280, seed=1)
    assert len({t.key for t in trials}) == 3 and all(t.answer for t in trials)
    assert all(tok.decode(t.answer).replace(" ", "") == t.key for t in trials)  # only the key's digits are scored
    policy = LayerwisePolicy({0: EvictionPolicy(KNormScorer(), 48, 8, 2),
                              1: EvictionPolicy(StreamingLLMScorer(4), 40, 8, 4)})
    trial = trials[0]
    with torch.inference_mode():
        ctx = torch.tensor([trial.context])
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(ctx, **cache_kwargs(model, cache), use_cache=True)
        keep = {i: _keep_static(p, cache.layers[i].keys, i) for i, p in policy.layers.items()}
    assert int(keep[0].sum(-1).max()) == 48 and int(keep[1].sum(-1).max()) == 40
    n_c, n_q = len(trial.context), len(trial.question)
    target = torch.tensor(trial.answer)

    def logprob(logits):  # teacher-forced log p(key tokens)
        rows = logits[n_c + n_q - 1:n_c + n_q - 1 + len(trial.answer)].log_softmax(-1)
        return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())

    run = run_passkey(model, [trial], {"full": None, "knorm": policy, "snap": SnapKV(40, observe=8)})
    for label, keep_used in (("knorm", keep), ("full", {})):
        lp, hit = logprob(_dense_reference(model, trial, keep_used))
        assert run.logprob[label][0] == pytest.approx(lp, rel=1e-6)  # float32 log-softmax in run_passkey
        assert run.hits[label] == [hit]
    assert run.logprob["knorm"][0] != pytest.approx(run.logprob["full"][0], rel=1e-6)  # compression changed it
    assert set(run.to_dict()["accuracy"]) == {"full", "knorm", "snap"}


def test_passkey_cli_reports_every_policy_with_the_snapkv_reference(smollm2, tmp_path) -> None:
    """`qfilters passkey` on the real model: full cache, the baselines, novelty and the attention-based reference per
    budget; a filter artifact without query moments adds Q-Filters only."""
    import json

    from typer.testing import CliRunner

    from qfilters.artifact import QFilters
    from qfilters.cli import app

    QFilters(torch.randn(*smollm2.info.filter_shape)).save_pretrained(tmp_path / "qf")
    result = CliRunner().invoke(app, ["passkey", "smollm2", "--filters", str(tmp_path / "qf"), "--budget", "64",
                                      "--trials", "2", "--context", "160", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["trials"] == 2
    assert set(report["accuracy"]) == {"full", "streamingllm@64", "knorm@64", "qfilters@64", "novelty@64",
                                       "content-novelty@64", "snapkv@64"}
