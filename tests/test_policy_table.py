"""The policy table is the one place methods are listed: a new scorer is one class plus one row, and it then goes
through the cache, the one-pass evaluator and a validation report (table, Markdown, HTML, figure) unchanged."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from eviction_reference import stored_lengths
from torch import Tensor

from qfilters.cache import QFiltersCache, cache_kwargs
from qfilters.data import Corpus, Document
from qfilters.evaluate import evaluate_policies, perplexity, perplexity_reference
from qfilters.policy import EvictionPolicy, LayerwisePolicy, check_budget
from qfilters.policy_table import (
    POLICY_TABLE,
    PolicyEntry,
    compared_policies,
    policy_order,
    register_policy,
    unregister_policy,
)
from qfilters.scorers import Scorer, make_scorer
from qfilters.validation.schema import PolicyRow


@dataclass
class FirstCoordinateScorer(Scorer):
    """Keep keys with a large first coordinate: static per key, so every exactness guarantee holds."""

    name: ClassVar[str] = "firstcoord"

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        return keys[..., 0].float()


@pytest.fixture
def firstcoord():
    register_policy(PolicyEntry("firstcoord", "First coordinate", "#17becf", FirstCoordinateScorer, compared=True))
    try:
        yield "firstcoord"
    finally:
        unregister_policy("firstcoord")


def _corpus(seed: int) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    words = ["the", "cache", "keeps", "keys", "queries", "attend", "to", "a", "few", "of", "them", "and", "drops"]
    docs = [Document(f"d{i}", " ".join(words[j] for j in torch.randint(len(words), (160,), generator=g).tolist()))
            for i in range(3)]
    return Corpus(spec=f"synthetic:{seed}", documents=docs, source="test")


def test_the_table_lists_each_method_once_in_order() -> None:
    assert list(POLICY_TABLE)[:4] == ["full", "qfilters", "knorm", "streamingllm"]
    assert compared_policies() == ("qfilters", "knorm", "streamingllm")
    assert policy_order(["streamingllm", "zzz", "qfilters", "full"]) == ["full", "qfilters", "streamingllm", "zzz"]
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("h2o")
    with pytest.raises(ValueError, match="not a static scorer"):
        make_scorer("snapkv")
    with pytest.raises(ValueError, match="already registered"):
        register_policy(PolicyEntry("knorm", "again", "#000000", FirstCoordinateScorer))
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyRow(policy="h2o", budget=8, window=4, perplexity=1.0, gap=0.0)


def test_eviction_policy_is_validated_once_with_one_message() -> None:
    for bad in (dict(budget=8, window=8), dict(budget=12, window=8, n_sinks=4)):
        with pytest.raises(ValueError, match="must exceed window"):
            EvictionPolicy(make_scorer("knorm"), **bad)
        with pytest.raises(ValueError, match="must exceed window"):
            check_budget(**bad)
    with pytest.raises(TypeError, match="Scorer"):
        EvictionPolicy("knorm", 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uncompressed_layers"):
        EvictionPolicy(make_scorer("knorm"), 32, 8, uncompressed_layers=(-1,))
    policy = EvictionPolicy(make_scorer("knorm"), 32, 8, uncompressed_layers=(3, 1, 3))
    assert policy.uncompressed_layers == (1, 3) and policy.for_layer(1) is None and policy.for_layer(0) is policy
    with pytest.raises(TypeError, match="inside the policy"):
        QFiltersCache(object(), policy, budget=16)


def test_a_new_scorer_is_one_class_and_one_row(firstcoord, tiny_llama) -> None:
    model, tok = copy.deepcopy(tiny_llama.model).to(torch.float64), tiny_llama.tokenizer
    scorer = make_scorer(firstcoord)
    assert isinstance(scorer, FirstCoordinateScorer)

    # the cache, during generate()
    ids = torch.randint(4, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = QFiltersCache(model, scorer, budget=16, window=4)
    with torch.inference_mode():
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=8, do_sample=False)
    assert stored_lengths(cache) == [16, 16]

    # the one-pass evaluator, exact against token-by-token decoding, uniform and per layer
    for policy in (EvictionPolicy(scorer, 20, 4, n_sinks=2),
                   LayerwisePolicy({1: EvictionPolicy(scorer, 12, 2)})):
        fast, slow = perplexity(model, ids, policy), perplexity_reference(model, ids, policy)
        assert abs(fast.nll_sum / slow.nll_sum - 1) < 1e-9

    # the policy comparison picks it up from the table
    filters = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(0))
    result = evaluate_policies(tiny_llama.model, tok, _corpus(5), filters, budgets=[24], window=8, seq_len=100,
                               score_last=40, progress=False)
    assert result.policies == ["qfilters", "knorm", "streamingllm", firstcoord]


def test_a_new_scorer_reaches_the_validation_report(firstcoord, tiny_llama) -> None:
    from qfilters.validation.figures import perplexity_plot
    from qfilters.validation.markdown import render_markdown
    from qfilters.validation.render import render_html
    from qfilters.validation.run import ValidationSettings, run_validation

    settings = ValidationSettings(tokens_per_dataset=256, calib_seq_len=128, eval_seq_len=128, score_last=64,
                                  budgets=(48,), max_docs=2)
    report = run_validation(tiny_llama, [_corpus(0), _corpus(1)], [_corpus(2)], settings,
                            created_at="2000-01-01T00:00:00Z").report
    rows = {(r.policy, r.budget) for p in report.perplexity for r in p.rows}
    assert (firstcoord, 48) in rows and ("qfilters", 48) in rows
    assert "First coordinate" in render_markdown(report)
    assert "First coordinate" in render_html(report)
    assert perplexity_plot(report.perplexity[0]).data[:4] == b"\x89PNG"
