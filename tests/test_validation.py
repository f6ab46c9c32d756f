"""Validation engine: stability maths, gates, risk warnings (synthetic), the whole run on the tiny Llama
(schema, determinism, consistency with evaluate_policies), bad input caught before any forward pass, and a small
real run on SmolLM2 (slow)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qfilters.data import Corpus, Document
from qfilters.errors import DatasetSpecError, ModelError, ShapeMismatchError
from qfilters.models import ModelInfo
from qfilters.validation.gates import (
    GATES,
    OPTIONAL_GATES,
    GateInputs,
    ValidationInputError,
    decide,
    evaluate_gate,
    parse_gate_overrides,
)
from qfilters.validation.risk import assess
from qfilters.validation.run import ValidationSettings, check_settings, run_validation, validate
from qfilters.validation.schema import ValidationReport
from qfilters.validation.stability import cross_dataset_stability, summarize, tokens_to_stable

# --- stability maths ---------------------------------------------------------------------------------------------


def _filters(seed: int, shape=(3, 2, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_identical_filter_sets_agree_perfectly() -> None:
    f = _filters(0)
    s = cross_dataset_stability(["a", "b", "c"], [f, f.clone(), f * 3.0])  # the norm does not matter
    assert s.mean_cosine == [[1.0] * 3] * 3
    assert s.min_cosine == [[1.0] * 3] * 3
    assert (s.summary.mean, s.summary.min, s.summary.p5, s.summary.share_above) == (1.0, 1.0, 1.0, 1.0)
    assert s.per_head_min == [[1.0, 1.0]] * 3
    assert s.per_layer_mean == [1.0] * 3


def test_a_flipped_head_shows_in_min_and_per_head_min() -> None:
    f = _filters(1)
    g = f.clone()
    g[1, 0] = -g[1, 0]  # one (layer, KV head) points the other way on dataset b
    s = cross_dataset_stability(["a", "b", "c"], [f, g, f])
    assert s.min_cosine[0][1] == s.min_cosine[1][0] == -1.0
    assert s.min_cosine[1][2] == -1.0 and s.min_cosine[0][2] == 1.0
    assert s.mean_cosine[0][1] == pytest.approx((5 * 1.0 - 1.0) / 6, abs=1e-6)
    assert s.per_head_min[1] == [-1.0, 1.0]
    assert s.per_head_min[0] == [1.0, 1.0] and s.per_head_min[2] == [1.0, 1.0]
    # layer 1 over 3 pairs x 2 heads: pairs (a,b) and (b,c) have -1 on head 0
    assert s.per_layer_mean[1] == pytest.approx((6 - 2 * 2) / 6, abs=1e-6)
    assert s.summary.min == -1.0
    assert s.summary.share_above == pytest.approx(16 / 18, abs=1e-6)


def test_stability_needs_two_sets_of_one_shape() -> None:
    with pytest.raises(ValueError, match="at least two"):
        cross_dataset_stability(["a"], [_filters(0)])
    with pytest.raises(ValueError, match="different shapes"):
        cross_dataset_stability(["a", "b"], [_filters(0), _filters(0, (3, 2, 4))])


def test_summary_percentile_and_share() -> None:
    s = summarize(torch.linspace(0.0, 1.0, 101, dtype=torch.float64), threshold=0.9)
    assert s.mean == 0.5 and s.min == 0.0 and s.p5 == pytest.approx(0.05) and s.share_above == pytest.approx(11 / 101,
                                                                                                               abs=1e-6)


def test_tokens_to_stable_is_the_first_checkpoint_reaching_the_threshold() -> None:
    cps = [{"tokens": 1, "agreement_min": None}, {"tokens": 2, "agreement_min": 0.99},
           {"tokens": 3, "agreement_min": 0.9991}, {"tokens": 4, "agreement_min": 0.9999}]
    assert tokens_to_stable(cps, 0.999) == 3
    assert tokens_to_stable(cps[:3], 0.9995) is None


# --- gates -------------------------------------------------------------------------------------------------------


def _inputs(ratio: float = 0.6, knorm_gap: float = 2.0, cosine: float = 0.98, split: float = 0.99) -> GateInputs:
    return GateInputs(cross_dataset_cosine=cosine, reference_gaps=[("a", 0.5, 1.0, 1.0), ("b", ratio, 1.0, knorm_gap)],
                      split_half_min=[("x", 0.999), ("y", split)], reference_budget=64)


def test_gates_pass_on_good_numbers() -> None:
    v = decide(_inputs(), parse_gate_overrides(None), warnings=["w"])
    assert v.status == "pass" and v.reasons == [] and v.warnings == ["w"]
    assert [g.name for g in v.gates] == [n for n in GATES if n not in OPTIONAL_GATES]
    by = {g.name: g for g in v.gates}
    assert by["gap_ratio_vs_streamingllm"].value == 0.6  # the worst dataset
    assert by["gap_vs_knorm"].value == pytest.approx(-0.5)
    assert by["split_half_min"].value == 0.99


def test_a_filter_that_ties_streamingllm_fails_with_a_reason() -> None:
    v = decide(_inputs(ratio=1.0), parse_gate_overrides(None))
    assert v.status == "fail"
    (failed,) = [g for g in v.gates if not g.passed]
    assert failed.name == "gap_ratio_vs_streamingllm" and failed.value == 1.0 and failed.threshold == 0.9
    assert len(v.reasons) == 1 and "StreamingLLM" in v.reasons[0] and "on b" in v.reasons[0]


def test_gate_boundaries_and_overrides() -> None:
    assert evaluate_gate("gap_ratio_vs_streamingllm", 0.9, 0.9).passed  # <=
    assert not evaluate_gate("gap_vs_knorm", 0.0, 0.0).passed  # strictly below
    assert evaluate_gate("cross_dataset_cosine", 0.9, 0.9).passed  # >=
    assert not evaluate_gate("split_half_min", 0.95, None).passed  # unmeasured fails
    thresholds = parse_gate_overrides(["gap_ratio_vs_streamingllm=1.05", "split_half_min = 0.5"])
    assert thresholds["gap_ratio_vs_streamingllm"] == 1.05 and thresholds["split_half_min"] == 0.5
    assert decide(_inputs(ratio=1.0, split=0.6), thresholds).status == "pass"
    assert parse_gate_overrides({"cross_dataset_cosine": 0.5})["cross_dataset_cosine"] == 0.5


@pytest.mark.parametrize("bad, match", [
    (["nope=1"], "unknown gate"), (["gap_vs_knorm"], "NAME=VALUE"), (["split_half_min=abc"], "not a number"),
    (["split_half_min=nan"], "finite"),
])
def test_bad_gate_overrides(bad, match) -> None:
    with pytest.raises(ValidationInputError, match=match):
        parse_gate_overrides(bad)


def test_undefined_ratio_and_failures_each_give_one_sentence() -> None:
    inputs = GateInputs(cross_dataset_cosine=0.5, reference_gaps=[("a", 0.1, 0.0, 1.0)],
                        split_half_min=[("x", 0.2)], reference_budget=64)
    v = decide(inputs, parse_gate_overrides(None))
    assert v.status == "fail"
    assert [g.passed for g in v.gates] == [False, False, True, False]
    assert len(v.reasons) == 3
    assert any("loses no perplexity" in r for r in v.reasons)
    assert all(r.endswith(".") and r.count(". ") <= 1 for r in v.reasons)


# --- architecture risk -------------------------------------------------------------------------------------------


def _info(**kw) -> ModelInfo:
    base = dict(model_id="m", revision=None, source="s", model_type="t", num_layers=18, num_attention_heads=4,
                num_kv_heads=1, head_dim=256, qk_norm=False, qkv_bias=False, rope=True, sliding_window=None,
                sliding_layers=())
    base.update(kw)
    return ModelInfo(**base)


def test_plain_llama_like_model_has_no_warnings() -> None:
    risk = assess(_info())
    assert risk.warnings == [] and risk.compressed_layers == list(range(18))
    assert risk.sigma_ratio_median is None


def test_gemma_like_model_warns_about_qk_norm_and_sliding_window() -> None:
    sliding = tuple(i for i in range(18) if i not in (5, 11, 17))
    risk = assess(_info(qk_norm=True, sliding_window=512, sliding_layers=sliding))
    text = " ".join(risk.warnings)
    assert "QK-norm" in text and "OLMo-2" in text
    assert "15 of 18 layers use sliding-window attention of 512 tokens" in text
    assert "Only 3 layers (5, 11, 17) are compressed" in text
    assert risk.compressed_layers == [5, 11, 17]


def test_bias_no_rope_and_all_sliding_warnings() -> None:
    risk = assess(_info(qkv_bias=True, rope=False, sliding_window=128, sliding_layers=tuple(range(18))))
    text = " ".join(risk.warnings)
    assert "Qwen-2.5" in text and "rotary position embeddings" in text and "compress nothing" in text


def test_measured_anisotropy_is_summarized_over_compressed_layers() -> None:
    sigma = [[1.1, 1.2]] + [[4.0, 5.0]] * 2  # layer 0 nearly isotropic, but it is a sliding layer
    share = [[0.5, 0.5]] + [[1.0, 0.6]] * 2
    risk = assess(_info(num_layers=3, sliding_layers=(0,), sliding_window=8),
                  statistics={"sigma_ratio": sigma, "positive_share": share})
    assert risk.sigma_ratio_min == 4.0 and risk.sigma_ratio_median == 4.0
    assert risk.positive_share_median == 0.6
    assert not any("isotropic" in w for w in risk.warnings)
    assert any("2 of 4 query heads" in w and "point along the filter" in w for w in risk.warnings)
    risk = assess(_info(num_layers=3), statistics={"sigma_ratio": sigma, "positive_share": share})
    assert any("2 of 6 query heads" in w and "nearly isotropic" in w for w in risk.warnings)


# --- settings ----------------------------------------------------------------------------------------------------


def test_default_settings_sweep_and_reference_budget() -> None:
    s = ValidationSettings()
    assert s.resolved_budgets() == [256, 128, 64, 32]
    assert s.resolved_reference_budget() == 64  # 16x at 1024 tokens
    assert [s.window_for(b) for b in (256, 128, 64, 32)] == [64, 64, 32, 16]
    assert ValidationSettings(budgets=(100,), reference_budget=50).resolved_budgets() == [100, 50]


@pytest.mark.parametrize("kw, match", [
    (dict(budgets=(1024,)), "not below the evaluation length"),
    (dict(budgets=(8,)), "leaves no slot"),
    (dict(score_last=1024), "score_last"),
    (dict(tokens_per_dataset=100), "less than one"),
    (dict(max_docs=0), "max_docs"),
    (dict(gates={"bogus": 1.0}), "unknown gate"),
    (dict(passkey_context=512), "does nothing without passkey trials"),
])
def test_bad_settings(kw, match) -> None:
    with pytest.raises(ValidationInputError, match=match):
        check_settings(ValidationSettings(**kw))


# --- the whole run on the tiny random Llama ----------------------------------------------------------------------

WORDS = "the of and to in is for on that with as by this from key query cache head layer filter".split()


def _corpus(seed: int, n_docs: int = 4, words: int = 160) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    docs = [Document(f"d{i}", " ".join(WORDS[j] for j in torch.randint(len(WORDS), (words,), generator=g).tolist()))
            for i in range(n_docs)]
    return Corpus(spec=f"synthetic:{seed}", documents=docs, source="test")


TINY = ValidationSettings(tokens_per_dataset=512, calib_seq_len=128, eval_seq_len=128, score_last=64,
                          budgets=(48, 24), max_docs=2)


class ForwardCounter:
    """Counts forward passes of the transformer stack (calibration and evaluation both go through it)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.base_model.register_forward_pre_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """The tiny model's ops are microseconds: with two threads on a busy 2-core machine they spend most of their time
    waiting for each other (6x slower). Real-model tests keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_thread(fn, *args):
    """``fn(*args)`` with one torch thread: module fixtures run outside the autouse fixture below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama):
    return one_thread(_tiny_run, tiny_llama)


def _tiny_run(tiny_llama):
    events = []
    run = run_validation(tiny_llama, [_corpus(0), _corpus(1), _corpus(2)], [_corpus(3), _corpus(4)], TINY,
                         on_progress=events.append, created_at="2000-01-01T00:00:00Z")
    return run, events


def test_report_is_complete_and_valid(tiny_run) -> None:
    run, events = tiny_run
    r = run.report
    again = ValidationReport.model_validate_json(r.model_dump_json())
    assert again == r
    assert r.settings.budgets == [48, 24] and r.settings.reference_budget == 24
    assert r.stability.datasets == ["synthetic:0", "synthetic:1", "synthetic:2"]
    assert len(r.stability.mean_cosine) == 3 and len(r.stability.per_head_min) == 2  # [L][H_kv]
    assert [s.dataset for s in r.sampling] == r.stability.datasets
    assert all(len(s.checkpoints) == 2 for s in r.sampling)  # 512 tokens, a checkpoint every batch of 2 x 128
    assert r.transfer.calibration[-1] == "combined" and len(r.transfer.perplexity) == 4
    assert len(r.transfer.perplexity[0]) == 2
    assert [p.dataset.spec for p in r.perplexity] == ["synthetic:3", "synthetic:4"]
    rows = r.perplexity[0].rows
    assert [(x.policy, x.budget, x.window) for x in rows[:4]] == [
        ("full", None, None), ("qfilters", 48, 24), ("knorm", 48, 24), ("streamingllm", 48, 24)]
    assert rows[-1].window == 12
    assert r.perplexity[0].dataset.documents == 2 and r.perplexity[0].dataset.tokens == 128
    assert {g.name for g in r.verdict.gates} == set(GATES) - OPTIONAL_GATES
    assert r.verdict.status == ("pass" if all(g.passed for g in r.verdict.gates) else "fail")
    assert len(r.verdict.reasons) == sum(not g.passed for g in r.verdict.gates)
    assert re.fullmatch(r"[0-9a-f]{64}", r.artifact_sha256)
    assert {e.phase for e in events} == {"calibrate", "evaluate", "transfer"}


def test_the_combined_filters_are_the_union_of_the_runs_and_the_sha_matches_the_saved_file(tiny_run,
                                                                                            tmp_path) -> None:
    from qfilters.artifact import sha256_file

    run, _ = tiny_run
    assert run.filters is run.combined
    assert run.combined.provenance["calibration"]["combined_from"] == 3
    path = run.filters.save_pretrained(tmp_path / "filters")
    assert sha256_file(path / "model.safetensors") == run.report.artifact_sha256


def test_numbers_are_those_of_evaluate_policies(tiny_run, tiny_llama) -> None:
    from qfilters.evaluate import evaluate_policies

    run, _ = tiny_run
    r = run.report
    ref = evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, _corpus(3), run.filters, budgets=[24], window=12,
                            seq_len=128, score_last=64, n_sinks_streaming=4, max_docs=2, progress=False)
    rows = {(x.policy, x.budget): x for x in r.perplexity[0].rows}
    assert r.perplexity[0].full_perplexity == round(ref.full_perplexity, 6)
    for policy in ("qfilters", "knorm", "streamingllm"):
        assert rows[policy, 24].perplexity == round(ref.perplexity(policy, 24), 6)
        assert rows[policy, 24].gap == round(ref.gap(policy, 24), 6)
    # budget 48 (window 24) is the evaluate_policies call of the sweep, budget 24 (window 12) extends it
    ref48 = evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, _corpus(3), run.filters, budgets=[48],
                              window=24, seq_len=128, score_last=64, n_sinks_streaming=4, max_docs=2, progress=False)
    for policy in ("qfilters", "knorm", "streamingllm"):
        assert rows[policy, 48].perplexity == round(ref48.perplexity(policy, 48), 6)
    assert r.transfer.perplexity[-1][0] == rows["qfilters", 24].perplexity
    # a transfer cell = evaluate_policies with that dataset's filters
    cell = evaluate_policies(tiny_llama.model, tiny_llama.tokenizer, _corpus(4), run.per_dataset[1].filters,
                             budgets=[24], window=12, seq_len=128, score_last=64, policies=("qfilters",),
                             max_docs=2, progress=False)
    assert r.transfer.perplexity[1][1] == round(cell.perplexity("qfilters", 24), 6)


def test_rerun_reproduces_the_json_byte_for_byte_except_created_at(tiny_run, tiny_llama) -> None:
    from qfilters.validation.output import report_json

    run, _ = tiny_run
    again = validate(tiny_llama, [_corpus(0), _corpus(1), _corpus(2)], [_corpus(3), _corpus(4)], TINY)
    assert again.created_at != run.report.created_at
    a = report_json(run.report)
    b = report_json(again.model_copy(update={"created_at": run.report.created_at}))
    assert a == b


# --- bad input: a clear error before any forward pass -------------------------------------------------------------


def _expect_no_forward(tiny_llama, exc, match, calib=None, evaluation=None, settings=TINY, **kw) -> None:
    calib = calib if calib is not None else [_corpus(0), _corpus(1)]
    evaluation = evaluation if evaluation is not None else [_corpus(3)]
    with ForwardCounter(tiny_llama.model) as counter, pytest.raises(exc, match=match):
        validate(tiny_llama, calib, evaluation, settings, **kw)
    assert counter.calls == 0


def test_unknown_dataset_spec(tiny_llama) -> None:
    _expect_no_forward(tiny_llama, DatasetSpecError, "nosuchkind", evaluation=["nosuchkind:xyz"])


def test_empty_corpus(tiny_llama) -> None:
    empty = Corpus(spec="empty", documents=[], source="test")
    _expect_no_forward(tiny_llama, ValidationInputError, "'empty' is empty", calib=[_corpus(0), empty])
    blank = Corpus(spec="blank", documents=[Document("x", "  \n")], source="test")
    _expect_no_forward(tiny_llama, ValidationInputError, "'blank' is empty", evaluation=[blank])


def test_too_little_text(tiny_llama) -> None:
    short = Corpus(spec="short", documents=[Document("x", "tiny text")], source="test")
    _expect_no_forward(tiny_llama, ValidationInputError, "only .* tokens", calib=[_corpus(0), short])
    _expect_no_forward(tiny_llama, ValidationInputError, "no document of 128 tokens", evaluation=[short])


def test_one_calibration_dataset_or_duplicates(tiny_llama) -> None:
    _expect_no_forward(tiny_llama, ValidationInputError, "at least two", calib=[_corpus(0)])
    _expect_no_forward(tiny_llama, ValidationInputError, "listed twice", calib=[_corpus(0), _corpus(0)])


def test_filters_for_another_model_shape(tiny_llama, tmp_path) -> None:
    from qfilters.artifact import QFilters

    path = QFilters(torch.randn(30, 3, 64)).save_pretrained(tmp_path / "smollm2-shaped")
    _expect_no_forward(tiny_llama, ShapeMismatchError, "different model", filters=str(path))
    _expect_no_forward(tiny_llama, ShapeMismatchError, "different model", filters=QFilters(torch.randn(2, 2, 8)))


def test_model_without_attention_layers(tiny_llama) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    from qfilters.models import LoadedModel

    mamba = MambaForCausalLM(MambaConfig(vocab_size=len(tiny_llama.tokenizer), hidden_size=16, num_hidden_layers=1,
                                         state_size=4)).eval()
    lm = LoadedModel(model=mamba, tokenizer=tiny_llama.tokenizer, info=tiny_llama.info)
    with ForwardCounter(mamba) as counter, pytest.raises(ModelError, match="no attention layers"):
        validate(lm, [_corpus(0), _corpus(1)], [_corpus(3)], TINY)
    assert counter.calls == 0


# --- CLI ---------------------------------------------------------------------------------------------------------


def _cli(args):
    from qfilters.cli import app

    return CliRunner().invoke(app, args)


def test_cli_bad_spec_exits_2_before_loading_the_model(tmp_path) -> None:
    start = time.perf_counter()
    res = _cli(["validate", "smollm2", "--calib", "handbook:en", "--calib", "nosuchkind:x", "--eval", "austen",
                "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "nosuchkind" in res.output
    assert time.perf_counter() - start < 10  # no model load, no forward pass
    assert not (tmp_path / "report.json").exists()


def test_cli_bad_gate_and_budget_exit_2(tmp_path) -> None:
    res = _cli(["validate", "smollm2", "-c", "handbook:en", "-c", "handbook:fr", "-e", "austen", "--out",
                str(tmp_path), "--gate", "speed=1"])
    assert res.exit_code == 2 and "unknown gate" in res.output
    res = _cli(["validate", "smollm2", "-c", "handbook:en", "-c", "handbook:fr", "-e", "austen", "--out",
                str(tmp_path), "--budget", "4096"])
    assert res.exit_code == 2 and "not below" in res.output


def test_cli_model_without_attention_exits_2(tmp_path, tiny_llama) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    model_dir = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=len(tiny_llama.tokenizer), hidden_size=16, num_hidden_layers=1,
                                 state_size=4)).save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    res = _cli(["validate", str(model_dir), "-c", "handbook:en", "-c", "handbook:fr", "-e", "austen", "--out",
                str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "attention" in res.output
    assert not (tmp_path / "out").exists()


def test_cli_report_rerenders_and_rejects_garbage(tiny_run, tmp_path) -> None:
    from qfilters.validation.output import report_json

    (tmp_path / "report.json").write_text(report_json(tiny_run[0].report))
    res = _cli(["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.json").read_text() == report_json(tiny_run[0].report)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text(json.dumps({"schema_version": "1", "model_id": 3}))
    res = _cli(["report", str(bad)])
    assert res.exit_code == 2
    res = _cli(["report", str(tmp_path / "missing")])
    assert res.exit_code == 2


def test_cli_validate_end_to_end_on_a_local_tiny_model(tiny_llama, tmp_path) -> None:
    """Local model directory + local text corpora: exit code follows the verdict, all files are written."""
    from qfilters.artifact import QFilters, sha256_file

    model_dir = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    specs = []
    for seed in range(4):
        d = tmp_path / f"corpus{seed}"
        d.mkdir()
        for i, doc in enumerate(_corpus(seed).documents):
            (d / f"doc{i}.txt").write_text(doc.text)
        specs.append(str(d))
    out = tmp_path / "out"
    args = ["validate", str(model_dir), "-c", specs[0], "-c", specs[1], "-e", specs[3], "--out", str(out),
            "--tokens", "512", "--calib-seq-len", "128", "--eval-seq-len", "128", "--score-last", "64",
            "--budget", "48", "--budget", "24", "--max-docs", "2", "--json"]
    res = _cli(args)
    report = ValidationReport.model_validate_json(res.stdout)
    assert res.exit_code == (0 if report.verdict.status == "pass" else 1), res.output
    assert {p.name for p in out.iterdir()} == {"report.json", "report.html", "report.md", "filters"}
    assert ValidationReport.model_validate_json((out / "report.json").read_text()) == report
    assert sha256_file(out / "filters" / "model.safetensors") == report.artifact_sha256
    assert QFilters.from_pretrained(out / "filters", expected_shape=tiny_llama.info.filter_shape)
    # loosen every gate: the same measurements now pass, and the exit code says so
    loose = ["--gate", "cross_dataset_cosine=-1", "--gate", "gap_ratio_vs_streamingllm=1e9", "--gate",
             "gap_vs_knorm=1e9", "--gate", "split_half_min=-1"]
    res = _cli(args + loose)
    again = ValidationReport.model_validate_json(res.stdout)
    if all(g.value is not None for g in again.verdict.gates):
        assert again.verdict.status == "pass" and res.exit_code == 0
    assert [g.value for g in again.verdict.gates] == [g.value for g in report.verdict.gates]


# --- real model (slow): SmolLM2, five calibration datasets, small ------------------------------------------------

SMALL = ValidationSettings(tokens_per_dataset=2048, calib_seq_len=512, eval_seq_len=512, score_last=256,
                           budgets=(64,), max_docs=2)
CALIB = ["handbook:en", "handbook:fr", "handbook:de", "handbook:es", "python-code"]


@pytest.mark.slow
def test_smollm2_small_validation(smollm2, artifacts_dir: Path) -> None:
    from qfilters.data import load_corpus
    from qfilters.evaluate import evaluate_policies
    from qfilters.validation.output import report_json

    start = time.perf_counter()
    run = run_validation(smollm2, CALIB, ["austen"], SMALL, created_at="2000-01-01T00:00:00Z")
    seconds = time.perf_counter() - start
    r = run.report
    (artifacts_dir / "validation_smollm2_small.json").write_text(report_json(r))
    assert ValidationReport.model_validate_json(report_json(r)) == r
    assert r.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert r.architecture.warnings == [] or all("isotropic" in w or "point along" in w for w in r.architecture.warnings)
    assert r.architecture.compressed_layers == list(range(30))
    assert [d.spec for d in r.calibration_datasets] == CALIB
    assert all(d.tokens == 2048 for d in r.calibration_datasets)
    assert r.stability.summary.mean > 0.9  # measured ~0.98 at 8k tokens
    assert r.verdict.status == ("pass" if all(g.passed for g in r.verdict.gates) else "fail")
    # consistency with `qfilters eval` (evaluate_policies with the same settings)
    ref = evaluate_policies(smollm2.model, smollm2.tokenizer, load_corpus("austen"), run.filters, budgets=[64],
                            window=32, seq_len=512, score_last=256, n_sinks_streaming=4, max_docs=2, progress=False)
    rows = {(x.policy, x.budget): x for x in r.perplexity[0].rows}
    for policy in ("qfilters", "knorm", "streamingllm"):
        assert rows[policy, 64].perplexity == round(ref.perplexity(policy, 64), 6)
    ratio = r.perplexity[0].gap_ratio_vs_streamingllm["64"]
    assert ratio == round(ref.gap("qfilters", 64) / ref.gap("streamingllm", 64), 6)
    print(f"SmolLM2 small validation: {seconds:.0f}s, verdict {r.verdict.status}, gap ratio {ratio}")


def test_source_date_epoch_fixes_the_report_timestamp(tiny_llama, monkeypatch) -> None:
    """Reproducible builds' convention: with SOURCE_DATE_EPOCH set, a rerun writes the same report JSON; a malformed
    value is refused before the first forward pass."""
    from qfilters.validation.run import _now

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764806400")
    assert _now() == "2025-12-04T00:00:00Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with ForwardCounter(tiny_llama.model) as counter:
        with pytest.raises(ValidationInputError, match="SOURCE_DATE_EPOCH"):
            run_validation(tiny_llama, [_corpus(0), _corpus(1)], [_corpus(2)], TINY)
    assert counter.calls == 0
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", _now())
