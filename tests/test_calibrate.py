"""Calibration: exact streaming SVD, capture leaves the model unchanged, padding excluded, reproducible, convergence."""

from __future__ import annotations

import pytest
import torch

from qfilters.attention import attention_hook, attention_layers
from qfilters.calibrate import CalibrationConfig, calibrate
from qfilters.data import Corpus, Document
from qfilters.errors import CalibrationError, ModelError
from qfilters.query_stats import QueryStatistics, group_mean


def _text_corpus(n_docs: int = 12, seed: int = 0) -> Corpus:
    words = "the of and to in is for on that with as by this from key query cache head layer filter".split()
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n_docs):
        idx = torch.randint(len(words), (400,), generator=g).tolist()
        docs.append(Document(f"doc{i}", " ".join(words[j] for j in idx)))
    return Corpus(spec=f"synthetic:{seed}", documents=docs, source="test")


# --- the maths -------------------------------------------------------------------------------------------------


def test_streamed_second_moment_gives_the_svd_direction_sign_fixed_along_queries() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(16, dtype=torch.float64, generator=g) * 3
    q = torch.randn(5000, 16, dtype=torch.float64, generator=g) + mean  # anisotropic: a shared offset
    stats = QueryStatistics(1, 1, 16)
    for part in q.split(777):  # streamed in uneven pieces
        stats.add(0, part[None, None].to(torch.float32).to(torch.float64), torch.tensor([0]), None)
    d = stats.directions()
    _, s, vh = torch.linalg.svd(q.to(torch.float32).to(torch.float64), full_matrices=False)
    v1 = vh[0] * torch.sign(q.sum(0) @ vh[0])
    assert torch.allclose(d.v1[0, 0], v1, atol=1e-9)
    assert (q @ d.v1[0, 0]).mean() > 0  # v1+ points along the queries
    assert d.sigma_ratio[0, 0].item() == pytest.approx((s[0] / s[1]).item(), rel=1e-9)


def test_gqa_filter_is_the_unnormalised_mean_of_its_query_heads_in_repeat_kv_order() -> None:
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 1.0]]])  # [L=1, Hq=4, D=2]
    kv = group_mean(v, num_kv_heads=2)
    assert torch.equal(kv, torch.tensor([[[0.5, 0.5], [2.0, 1.0]]]))


def test_memory_of_statistics_does_not_depend_on_tokens() -> None:
    stats = QueryStatistics(2, 4, 8)
    before = [t.numel() for t in (stats.second_moment, stats.query_sum)]
    for _ in range(5):
        stats.add(1, torch.randn(3, 4, 100, 8), torch.tensor([0, 1, 0]), None)
    assert [t.numel() for t in (stats.second_moment, stats.query_sum)] == before
    assert stats.count[:, 1].sum() == 5 * 3 * 100


# --- capture on the tiny model ---------------------------------------------------------------------------------


def test_padding_never_enters_the_statistics(tiny_llama) -> None:
    model = tiny_llama.model
    a, b = torch.randint(4, 90, (1, 40)), torch.randint(4, 90, (1, 25))

    def run(batches) -> QueryStatistics:
        stats = QueryStatistics(2, 4, 16)

        def hook(module, q, k, v, mask, base_fn, **kw):
            stats.add(module.layer_idx, q, torch.zeros(q.shape[0], dtype=torch.long), hook.token_mask)
            return base_fn(module, q, k, v, mask, **kw)

        with torch.no_grad(), attention_hook(model, hook):
            for ids, mask in batches:
                hook.token_mask = mask.bool()
                model.base_model(input_ids=ids, attention_mask=mask)
        return stats

    padded = torch.cat([a, torch.cat([b, torch.full((1, 15), 3)], 1)])
    mask = torch.cat([torch.ones(1, 40), torch.cat([torch.ones(1, 25), torch.zeros(1, 15)], 1)]).long()
    together = run([(padded, mask)])
    separate = run([(a, torch.ones_like(a)), (b, torch.ones_like(b))])
    assert together.count.tolist() == separate.count.tolist() == [[65, 65], [0, 0]]
    assert torch.allclose(together.second_moment, separate.second_moment, rtol=1e-5, atol=1e-6)


def test_calibration_never_runs_the_lm_head(tiny_llama) -> None:
    calls = []
    handle = tiny_llama.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        calibrate(tiny_llama, [_text_corpus()], CalibrationConfig(max_tokens=1024, seq_len=128, batch_size=2))
    finally:
        handle.remove()
    assert calls == []


def test_calibration_result_has_public_shape_and_provenance(tiny_llama) -> None:
    res = calibrate(tiny_llama, [_text_corpus(), _text_corpus(seed=1)],
                    CalibrationConfig(max_tokens=2048, seq_len=128, batch_size=3, checkpoint_every=512))
    assert tuple(res.filters.filters.shape) == (2, 2, 16)
    prov = res.filters.provenance
    assert prov["calibration"]["tokens"] == res.tokens == 2048
    assert [d["tokens"] for d in prov["calibration"]["datasets"]] == [1024, 1024]  # mixed evenly
    assert len(prov["statistics"]["sigma_ratio"]) == 2 and len(prov["statistics"]["sigma_ratio"][0]) == 4
    assert len(prov["statistics"]["split_half_cosine"][0]) == 2
    assert all(0.0 <= x <= 1.0 for row in prov["statistics"]["positive_share"] for x in row)
    # checkpoints fall on the first batch boundary (3 x 128 tokens) at or past each multiple of 512, and at the end
    assert [cp.tokens for cp in res.checkpoints] == [768, 1152, 1536, 2048]


def test_until_stable_stops_once_filters_stop_moving(tiny_llama) -> None:
    config = CalibrationConfig(max_tokens=8192, seq_len=128, batch_size=2, checkpoint_every=256, until_stable=0.5)
    res = calibrate(tiny_llama, [_text_corpus(n_docs=40)], config)
    assert res.stopped_early and res.tokens < 8192
    assert res.checkpoints[-1].agreement_min >= 0.5
    assert res.filters.provenance["calibration"]["stopped_early"] is True


def test_empty_corpus_is_a_clear_error(tiny_llama) -> None:
    empty = Corpus(spec="synthetic:empty", documents=[], source="test")
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        calibrate(tiny_llama, [empty], CalibrationConfig(max_tokens=256, seq_len=64))


def test_bad_config_is_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="until_stable"):
        CalibrationConfig(until_stable=1.5)
    with pytest.raises(ValueError, match="positive"):
        CalibrationConfig(seq_len=0)


def test_model_without_attention_layers_is_refused() -> None:
    with pytest.raises(ModelError, match="no attention layers"):
        attention_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# --- real models -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_capture_does_not_change_what_the_model_computes(name, request) -> None:
    """Outputs with capture on equal plain sdpa outputs; on Gemma-3 this needs the sliding-window masks (T > 512).

    Compared on the last hidden state: the LM head is a fixed function of it, and Gemma-3's 262k-vocabulary logits
    would cost more than the whole test."""
    lm = request.getfixturevalue(name)
    ids = torch.randint(100, 5000, (2, 600), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -50:] = 0  # padding in the batch too
    stats = QueryStatistics(lm.info.num_layers, lm.info.num_attention_heads, lm.info.head_dim)

    def capture(module, q, k, v, attn_mask, base_fn, **kw):
        stats.add(module.layer_idx, q, torch.tensor([0, 1]), mask.bool())
        return base_fn(module, q, k, v, attn_mask, **kw)

    def hidden() -> torch.Tensor:
        return lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    with torch.no_grad():
        plain = hidden()
        with attention_hook(lm.model, capture):
            captured = hidden()
        after = hidden()
    assert torch.equal(plain, captured)
    assert torch.equal(plain, after)  # the model is restored afterwards
    assert lm.model.config._attn_implementation == "sdpa"
    assert stats.tokens == 600 + 550


@pytest.mark.slow
def test_gemma3_sliding_layers_would_break_without_the_mask_function(gemma3) -> None:
    """Negative control for the test above: a custom attention function registered without its mask function turns
    Gemma-3's sliding-window layers into full attention, and the logits change."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("test_no_mask_fn", sdpa_attention_forward)
    ids = torch.randint(100, 5000, (1, 600), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = gemma3.model.base_model(input_ids=ids).last_hidden_state
        gemma3.model.set_attn_implementation("test_no_mask_fn")
        try:
            broken = gemma3.model.base_model(input_ids=ids).last_hidden_state
        finally:
            gemma3.model.set_attn_implementation("sdpa")
    assert not torch.allclose(plain[:, 520:], broken[:, 520:], atol=1e-3)
    assert torch.allclose(plain[:, :500], broken[:, :500], atol=1e-4)  # identical while the window is not full


@pytest.mark.slow
def test_same_seed_same_inputs_give_identical_artifact_bytes(smollm2, tmp_path) -> None:
    from qfilters.artifact import sha256_file
    from qfilters.data import load_corpus

    corpus = load_corpus("austen")
    config = CalibrationConfig(max_tokens=2048, seq_len=512, batch_size=2, seed=7)
    paths = [calibrate(smollm2, [corpus], config).filters.save_pretrained(tmp_path / f"run{i}") for i in range(2)]
    assert sha256_file(paths[0] / "model.safetensors") == sha256_file(paths[1] / "model.safetensors")
    assert (paths[0] / "qfilters.json").read_bytes() == (paths[1] / "qfilters.json").read_bytes()


def test_combining_runs_equals_one_run_over_all_the_data(tiny_llama) -> None:
    from qfilters.calibrate import combine_results
    from qfilters.query_stats import cosine

    a, b = _text_corpus(seed=3), _text_corpus(seed=4)
    config = CalibrationConfig(max_tokens=1024, seq_len=128, batch_size=2)
    runs = [calibrate(tiny_llama, [c], config) for c in (a, b)]
    combined = combine_results(tiny_llama, runs)
    together = calibrate(tiny_llama, [a, b], CalibrationConfig(max_tokens=2048, seq_len=128, batch_size=2))
    assert cosine(combined.filters, together.filters.filters).min() > 0.99999
    prov = combined.provenance["calibration"]
    assert prov["tokens"] == 2048 and [d["spec"] for d in prov["datasets"]] == [a.spec, b.spec]
