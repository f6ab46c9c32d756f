"""The method works on a real model: SmolLM2 filters from handbook:en beat StreamingLLM and K-norm on held-out Austen.

Setting (issue acceptance 1): >= 8k calibration tokens of handbook:en; evaluation on the first 2048-token chunk of
each of the six novels, last 1024 tokens scored and pooled; budget 128 (16x at the end of the chunk), window 64,
StreamingLLM with 4 sinks and the same budget. Pass: gap(QF) <= 0.78 x gap(StreamingLLM) and gap(QF) < gap(K-norm).
Per-book ratios are written to test-artifacts/acceptance_smollm2.json (they vary, about 0.55 to 0.9).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

BUDGET, WINDOW = 128, 64


@pytest.fixture(scope="module")
def handbook_filters(smollm2):
    from qfilters.calibrate import CalibrationConfig, calibrate
    from qfilters.data import load_corpus

    config = CalibrationConfig(max_tokens=16_384, seq_len=2048, batch_size=4, seed=0)
    return calibrate(smollm2, [load_corpus("handbook:en")], config).filters


@pytest.fixture(scope="module")
def austen_eval(smollm2, handbook_filters):
    from qfilters.data import load_corpus
    from qfilters.evaluate import evaluate_policies

    return evaluate_policies(smollm2.model, smollm2.tokenizer, load_corpus("austen"), handbook_filters,
                             budgets=[BUDGET], window=WINDOW, seq_len=2048, score_last=1024, n_sinks_streaming=4,
                             progress=False)


def test_qfilters_cut_the_streamingllm_gap_and_beat_knorm(austen_eval, artifacts_dir) -> None:
    result = austen_eval
    record = result.to_dict()
    (artifacts_dir / "acceptance_smollm2.json").write_text(json.dumps(record, indent=2))
    gap = {p: result.gap(p, BUDGET) for p in ("qfilters", "streamingllm", "knorm")}
    ratio = result.gap_ratio("qfilters", "streamingllm", BUDGET)
    assert all(g > 0 for g in gap.values()), gap  # eviction at 16x must cost something, else the setup is wrong
    assert ratio <= 0.78, f"gap(QF)/gap(StreamingLLM) = {ratio:.3f} > 0.78; gaps {gap}"
    assert gap["qfilters"] < gap["knorm"], gap


def test_all_six_novels_are_scored(austen_eval) -> None:
    record = austen_eval.to_dict()
    assert record["documents_evaluated"] == 6
    assert record["tokens_scored_per_policy"] == 6 * 1024
