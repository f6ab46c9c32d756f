"""Scorers: shape, determinism and causality for every method in SCORERS, plus each method's own expression."""

from __future__ import annotations

import pytest
import torch

from qfilters.errors import ShapeMismatchError
from qfilters.policy_table import POLICY_TABLE
from qfilters.scorers import (
    KNormScorer,
    QFilterScorer,
    RandomScorer,
    Scorer,
    StreamingLLMScorer,
    make_scorer,
)

L, H, D = 3, 2, 8
# every scorer of the policy table that filters alone can build
SCORERS = {n: e.scorer_class() for n, e in POLICY_TABLE.items() if e.scorer is not None and set(e.needs) <= {"filters"}}


def _filters(seed: int = 0) -> torch.Tensor:
    return torch.randn(L, H, D, generator=torch.Generator().manual_seed(seed))


def _keys(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, H, length, D, generator=torch.Generator().manual_seed(seed))


def _make(name: str) -> Scorer:
    return make_scorer(name, filters=_filters())


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_shape_dtype_and_determinism(name: str) -> None:
    scorer, keys = _make(name), _keys()
    pos = torch.arange(keys.shape[2])
    a, b = scorer.score(keys, 1, pos), scorer.score(keys.clone(), 1, pos.clone())
    assert a.shape == (2, H, 12) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.isnan(a).any()
    assert isinstance(scorer, SCORERS[name]) and scorer.name == name


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_are_causal_per_key(name: str) -> None:
    """A key's score depends on itself, its layer/head, its position and, for a scorer with a running state, the
    earlier keys of its row: never on later keys or other batch rows. Static scorers read no other key at all."""
    scorer, keys = _make(name), _keys(length=16)
    pos = torch.arange(100, 116)
    full = scorer.score(keys, 2, pos)
    # scoring one key at a time through score_stream (as the cache does during decoding) gives the same numbers
    parts, state = [], None
    for t in range(16):
        part, state = scorer.score_stream(keys[:, :, t : t + 1], 2, pos[t : t + 1], state)
        parts.append(part)
    assert torch.equal(full, torch.cat(parts, dim=-1))
    # later keys and the other batch row change nothing for key 5 of row 0
    other = _keys(length=16, seed=7)
    other[0, :, :6] = keys[0, :, :6]
    assert torch.equal(scorer.score(other, 2, pos)[0, :, 5], full[0, :, 5])
    if type(scorer).score_stream is Scorer.score_stream:  # static: earlier keys do not matter either
        other[0, :, :5] = _keys(length=16, seed=8)[0, :, :5]
        assert torch.equal(scorer.score(other, 2, pos)[0, :, 5], full[0, :, 5])


def test_qfilter_score_is_kvpress_expression_and_accepts_qfilters_objects() -> None:
    f, keys = _filters(), _keys()
    pos = torch.arange(keys.shape[2])
    expected = -(f[1][None, :, None] * keys).sum(dim=-1)  # kvpress QFilterPress.score
    assert torch.equal(QFilterScorer(f).score(keys, 1, pos), expected)

    class Holder:
        filters = f

    assert torch.equal(QFilterScorer(Holder()).score(keys, 1, pos), expected)
    # a key pointing against the stored filter (-v1+, i.e. along the queries) scores highest: it is kept
    aligned = -f[0, 0] / f[0, 0].norm()
    probe = torch.stack([aligned, -aligned, torch.zeros(D)])[None, None].expand(1, H, 3, D).contiguous()
    s = QFilterScorer(f).score(probe, 0, torch.arange(3))[0, 0]
    assert s[0] > s[2] > s[1]


def test_qfilter_scorer_of_an_artifact_scores_with_its_stored_tensor() -> None:
    artifact = pytest.importorskip("qfilters.artifact")
    f, keys = _filters(), _keys()
    qf = artifact.QFilters(f)
    expected = (-(qf.filters[2].to(keys.dtype)[None, :, None] * keys).sum(dim=-1)).float()  # kvpress's expression
    assert torch.equal(QFilterScorer(qf).score(keys, 2, torch.arange(12)), expected)


def test_qfilter_shape_mismatches_name_both_shapes() -> None:
    scorer = QFilterScorer(_filters())
    with pytest.raises(ShapeMismatchError, match=r"\(3, 2, 8\).*\(30, 3, 64\)"):
        scorer.check_model(30, 3, 64)
    scorer.check_model(L, H, D)
    bad_keys = torch.randn(1, 3, 4, D)
    with pytest.raises(ShapeMismatchError, match=r"\(1, 3, 4, 8\).*\(3, 2, 8\)"):
        scorer.score(bad_keys, 0, torch.arange(4))
    with pytest.raises(ShapeMismatchError, match="layer 3"):
        scorer.score(_keys(), 3, torch.arange(12))
    with pytest.raises(ShapeMismatchError):
        QFilterScorer(torch.randn(3, 8))
    with pytest.raises(TypeError):
        QFilterScorer([1.0, 2.0])


def test_knorm_keeps_low_norm_keys() -> None:
    keys = _keys()
    s = KNormScorer().score(keys, 0, torch.arange(12))
    assert torch.allclose(s, -keys.norm(dim=-1))
    small = keys.clone()
    small[:, :, 3] *= 1e-3
    assert (KNormScorer().score(small, 0, torch.arange(12)).argmax(dim=-1) == 3).all()


def test_streamingllm_sinks_then_recency() -> None:
    s = StreamingLLMScorer(n_sinks=2).score(_keys(length=6), 0, torch.arange(6))
    assert torch.isinf(s[..., :2]).all() and (s[..., :2] > 0).all()
    assert torch.equal(s[0, 0, 2:], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    with pytest.raises(ValueError, match="n_sinks"):
        StreamingLLMScorer(n_sinks=-1)


def test_random_scorer_is_reproducible_and_varies_with_layer_head_seed() -> None:
    keys, pos = _keys(length=2000), torch.arange(2000)
    s = RandomScorer(seed=3).score(keys, 1, pos)
    assert ((s >= 0) & (s < 1)).all()
    assert torch.equal(s[0], s[1])  # same numbers for every batch row
    assert not torch.equal(s[0, 0], s[0, 1])  # heads differ
    assert not torch.equal(s, RandomScorer(seed=3).score(keys, 2, pos))  # layers differ
    assert not torch.equal(s, RandomScorer(seed=4).score(keys, 1, pos))  # seeds differ
    assert abs(float(s.mean()) - 0.5) < 0.03 and s[0, 0].unique().numel() > 1990  # roughly uniform, few ties
    with pytest.raises(ValueError, match="seed"):
        RandomScorer(seed=-1)


def test_make_scorer_errors() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("h2o")
    with pytest.raises(ValueError, match="needs filters"):
        make_scorer("qfilters")
    assert make_scorer("streamingllm", n_sinks=7).n_sinks == 7


def test_positions_must_match_keys() -> None:
    with pytest.raises(ShapeMismatchError, match="positions"):
        KNormScorer().score(_keys(length=5), 0, torch.arange(4))
