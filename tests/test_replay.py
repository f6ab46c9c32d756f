"""Replaying the unchanged layers: a pass that starts at layer i gives what recomputing every layer gives."""

from __future__ import annotations

import copy

import pytest
import torch

from qfilters.errors import ModelError
from qfilters.evaluate import perplexity
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.recipes import layer_sensitivity
from qfilters.replay import LayerReplay, decoder_layers, replayable
from qfilters.scorers import KNormScorer


@pytest.fixture
def model64(tiny_llama):
    return copy.deepcopy(tiny_llama.model).to(torch.float64)


def _ids(length: int = 48, seed: int = 4) -> torch.Tensor:
    return torch.randint(4, 90, (1, length), generator=torch.Generator().manual_seed(seed))


def test_a_replayed_pass_equals_the_whole_pass_at_every_start(model64) -> None:
    ids = _ids()
    replay = LayerReplay(model64)
    with replay.recording(ids):
        full = perplexity(model64, ids, None, 24).nll_sum
    assert len(replay.outputs) == 2
    for start in (0, 1):
        policy = LayerwisePolicy({start: EvictionPolicy(KNormScorer(), 12, 3)})
        whole = perplexity(model64, ids, policy, 24).nll_sum
        with replay.starting_at(start, ids):
            replayed = perplexity(model64, ids, policy, 24).nll_sum
        assert replayed == pytest.approx(whole, rel=1e-12)
        assert whole != full  # eviction changes something, so the equality above is not between two full passes
    with replay.starting_at(2, ids):  # every layer replayed: the full cache's logits
        assert perplexity(model64, ids, None, 24).nll_sum == pytest.approx(full, rel=1e-12)


def test_replayed_layers_do_no_work_and_are_put_back(model64) -> None:
    ids = _ids()
    calls: list[int] = []
    layers = decoder_layers(model64)
    handles = [layer.mlp.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        replay = LayerReplay(model64)
        with replay.recording(ids):
            model64(ids)
        calls.clear()
        with replay.starting_at(1, ids):
            model64(ids)
        assert calls == [1]  # layer 0 returned its recorded output without running
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"), replay.starting_at(1, ids):
            raise RuntimeError("boom")
        model64(ids)
        assert calls == [0, 1]  # the layers compute again after the block, even one left by an exception
        assert all("forward" not in layer.__dict__ for layer in layers)
    finally:
        for handle in handles:
            handle.remove()


def test_replay_refuses_another_input_or_nothing_recorded(model64) -> None:
    ids = _ids()
    replay = LayerReplay(model64)
    with pytest.raises(ModelError, match="nothing recorded"), replay.starting_at(1, ids):
        pass
    with replay.recording(ids):
        model64(ids)
    with pytest.raises(ValueError, match="replays the input it recorded"), replay.starting_at(1, _ids(seed=5)):
        pass
    with pytest.raises(ValueError, match="start must be"), replay.starting_at(3, ids):
        pass
    with pytest.raises(ModelError, match="one forward pass"), LayerReplay(model64).recording(ids):
        model64(ids)
        model64(ids)


def test_layer_sensitivity_is_what_compressing_one_layer_alone_costs(model64) -> None:
    chunks = [_ids(seed=4), _ids(seed=6)]
    scorer = KNormScorer()
    measured = layer_sensitivity(model64, chunks, scorer, 12, 3, 24)
    full = sum(perplexity(model64, c, None, 24).nll_sum for c in chunks)
    for i, increase in zip(measured.layers, measured.nll_increase, strict=True):
        alone = LayerwisePolicy({i: EvictionPolicy(scorer, 12, 3)})
        nll = sum(perplexity(model64, c, alone, 24).nll_sum for c in chunks)
        assert increase == pytest.approx((nll - full) / 48, rel=1e-9)


def test_replay_on_a_model_with_sliding_layers(gemma3) -> None:
    model = gemma3.model
    ids = gemma3.tokenizer("It is a truth universally acknowledged, " * 12, return_tensors="pt").input_ids[:, :96]
    from qfilters.architecture import compressed_layers

    start = compressed_layers(model)[1]
    policy = LayerwisePolicy({start: EvictionPolicy(KNormScorer(), 32, 8)})
    replay = LayerReplay(model)
    with replay.recording(ids):
        full = perplexity(model, ids, None, 48).nll_sum
    whole = perplexity(model, ids, policy, 48).nll_sum
    with replay.starting_at(start, ids):
        replayed = perplexity(model, ids, policy, 48).nll_sum
    assert replayed == pytest.approx(whole, rel=1e-5) and whole != full


def test_a_layer_changing_its_input_in_place_cannot_spoil_the_recording(model64) -> None:
    ids = _ids()
    layer1 = decoder_layers(model64)[1]
    handle = layer1.register_forward_pre_hook(lambda module, args, kwargs: (args[0].add_(1.0), None)[1],
                                              with_kwargs=True)
    try:
        replay = LayerReplay(model64)
        with replay.recording(ids):
            full = perplexity(model64, ids, None, 24).nll_sum
        for _ in range(2):  # each replay hands layer 1 a fresh copy of what layer 0 returned
            with replay.starting_at(1, ids):
                assert perplexity(model64, ids, None, 24).nll_sum == pytest.approx(full, rel=1e-12)
    finally:
        handle.remove()


def test_models_whose_layers_cannot_be_replayed_get_whole_passes(model64, monkeypatch) -> None:
    assert replayable(model64)
    monkeypatch.setattr(model64.config, "num_kv_shared_layers", 1, raising=False)  # later layers read earlier K/V
    assert not replayable(model64)
    with pytest.raises(ModelError, match="cannot be replayed"):
        LayerReplay(model64)
    chunks = [_ids()]
    measured = layer_sensitivity(model64, chunks, KNormScorer(), 12, 3, 24)  # falls back to whole passes
    monkeypatch.setattr(model64.config, "num_kv_shared_layers", 0)
    assert measured.nll_increase == pytest.approx(layer_sensitivity(model64, chunks, KNormScorer(), 12, 3, 24)
                                                  .nll_increase, rel=1e-12)
