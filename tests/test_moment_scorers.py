"""Scorers from calibration query moments: formula, exactness of the one-pass evaluator, artifact round trip."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from qfilters.artifact import QFilters
from qfilters.errors import ArtifactError, ShapeMismatchError
from qfilters.evaluate import perplexity, perplexity_reference
from qfilters.moment_scorers import GaussianScorer, MeanQueryScorer
from qfilters.moments import STATS_NAME, QueryMoments, load_moments, save_moments
from qfilters.policy import EvictionPolicy
from qfilters.query_stats import QueryStatistics


def _moments(layers: int = 2, hq: int = 4, kv: int = 2, d: int = 16, seed: int = 0) -> QueryMoments:
    """Moments of random anisotropic queries with a non-zero mean, accumulated the way calibration does."""
    g = torch.Generator().manual_seed(seed)
    stats = QueryStatistics(layers, hq, d)
    mix = torch.randn(layers, hq, d, d, generator=g, dtype=torch.float64)
    for layer in range(layers):
        z = torch.randn(1, hq, 300, d, generator=g, dtype=torch.float64)
        q = torch.einsum("bhtd,hde->bhte", z, mix[layer]) + torch.randn(hq, 1, d, generator=g, dtype=torch.float64)
        stats.add(layer, q, torch.tensor([0]), None)
    return QueryMoments.from_statistics(stats, kv)


def test_gaussian_score_is_log_expected_attention_combined_over_the_group() -> None:
    m = _moments()
    scorer = GaussianScorer(m)
    keys = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(3))
    got = scorer.score(keys, 1, torch.arange(5))
    cov = m.covariance()[1]  # [Hq, D, D]
    s = 1 / math.sqrt(16)
    for h_kv in range(2):
        for t in range(5):
            k = keys[0, h_kv, t].double()
            terms = [s * m.mean[1, h] @ k + s * s * k @ cov[h] @ k / 2 for h in (2 * h_kv, 2 * h_kv + 1)]
            assert got[0, h_kv, t].item() == pytest.approx(torch.logsumexp(torch.stack(terms), 0).item(), rel=1e-4)
    # full rank == no rank; weight 0 == mean-only log-sum-exp; the mean scorer is the group mean's logit (unscaled)
    assert torch.allclose(GaussianScorer(m, rank=16).score(keys, 1, torch.arange(5)), got, rtol=1e-4, atol=1e-5)
    lin = GaussianScorer(m, variance_weight=0.0).score(keys, 1, torch.arange(5))
    mu = m.mean[1].reshape(2, 2, 16)
    expected = torch.logsumexp(torch.einsum("hgd,bhtd->bhgt", s * mu, keys.double()), dim=2)
    assert torch.allclose(lin.double(), expected, atol=1e-5)
    meanq = MeanQueryScorer(m).score(keys, 1, torch.arange(5))
    assert torch.allclose(meanq.double(), torch.einsum("hd,bhtd->bht", mu.mean(1), keys.double()), atol=1e-4)


def test_low_rank_gaussian_keeps_the_dominant_query_directions() -> None:
    m = _moments()
    factor = m.covariance_factor(rank=3)  # [L, Hq, D, 3]
    cov = m.covariance()
    evals = torch.linalg.eigvalsh(cov)
    # the rank-3 factor reproduces the top-3 eigenvalues of Sigma
    top = torch.linalg.eigvalsh(factor @ factor.transpose(-1, -2))[..., -3:]
    assert torch.allclose(top, evals[..., -3:], rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="rank"):
        m.covariance_factor(rank=17)


@pytest.mark.parametrize("name,kwargs", [("gaussian", {}), ("gaussian", {"rank": 2}), ("meanq", {})])
def test_one_pass_is_exact_for_moment_scorers(tiny_llama, name, kwargs) -> None:
    """The evaluator's closed form holds for the new scorers: same per-sequence perplexity as decoding."""
    model = copy.deepcopy(tiny_llama.model).to(torch.float64)
    ids = torch.randint(4, 90, (2, 72), generator=torch.Generator().manual_seed(5))
    scorer = {"meanq": MeanQueryScorer, "gaussian": GaussianScorer}[name](_moments(), **kwargs)
    fast = perplexity(model, ids, EvictionPolicy(scorer, 24, 6, n_sinks=2))
    slow = perplexity_reference(model, ids, EvictionPolicy(scorer, 24, 6, n_sinks=2))
    for a, b in zip(fast.per_sequence_perplexity, slow.per_sequence_perplexity, strict=True):
        assert abs(a / b - 1) < 1e-9
    assert fast.nll_sum != perplexity(model, ids, None).nll_sum  # eviction happened


def test_moments_for_another_model_are_refused(tiny_llama) -> None:
    scorer = GaussianScorer(_moments(layers=3))
    with pytest.raises(ShapeMismatchError, match="another model"):
        perplexity(tiny_llama.model, torch.randint(4, 90, (1, 40)), EvictionPolicy(scorer, 16, 4))


def test_artifact_carries_moments_and_kvpress_files_stay_unchanged(tmp_path) -> None:
    m = _moments()
    filters = QFilters(torch.randn(2, 2, 16))
    path = filters.save_pretrained(tmp_path / "a")
    public = {n: (path / n).read_bytes() for n in ("model.safetensors", "config.json")}
    assert load_moments(path) is None  # an artifact without the optional file
    save_moments(path, m)
    meta = json.loads((path / "qfilters.json").read_text())
    assert len(meta["query_stats_sha256"]) == 64
    assert {n: (path / n).read_bytes() for n in public} == public  # the public format is untouched
    loaded = load_moments(path)
    assert torch.equal(loaded.mean, m.mean) and torch.equal(loaded.second, m.second)
    assert (loaded.tokens, loaded.num_kv_heads) == (m.tokens, m.num_kv_heads)
    assert torch.equal(QFilters.from_pretrained(path).filters, filters.filters)  # our strict loader still reads it
    from safetensors.torch import load_file

    assert set(load_file(str(path / "model.safetensors"))) == {"q_filters"}  # what kvpress's mixin loads

    data = bytearray((path / STATS_NAME).read_bytes())
    data[-1] ^= 1
    (path / STATS_NAME).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_moments(path)
    with pytest.raises(ShapeMismatchError):
        save_moments(path, _moments(layers=3))
