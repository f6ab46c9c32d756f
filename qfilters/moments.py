"""Query moments kept from calibration, and the optional artifact file that carries them.

Calibration already sums post-RoPE queries and their outer products per (layer, query head) in float64
(``qfilters.query_stats``). The paper's filter keeps only the top eigenvector of the second moment; the moments
themselves (mean ``mu`` and covariance ``Sigma`` of the queries) give richer static key scores
(``qfilters.moment_scorers``). They travel in an OPTIONAL file, ``query_stats.safetensors``, next to the public
artifact: ``model.safetensors`` (the ``q_filters`` tensor kvpress and the official loader read) is unchanged, and the
new file's sha256 is recorded in ``qfilters.json`` under ``query_stats_sha256`` so a tampered file is caught.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qfilters.errors import ArtifactError, ShapeMismatchError
from qfilters.fileio import atomic_path, atomic_write_text

__all__ = ["STATS_NAME", "QueryMoments", "load_moments", "save_moments"]

STATS_NAME = "query_stats.safetensors"
STATS_SHA_KEY = "query_stats_sha256"


@dataclass
class QueryMoments:
    """Per (layer, query head): query mean ``mean`` [L, Hq, D] and second moment ``second`` = E[q q^T] [L, Hq, D, D].

    float64; ``tokens`` = calibration tokens per layer. ``num_kv_heads`` tells how query heads group (repeat_kv order).
    """

    mean: torch.Tensor
    second: torch.Tensor
    tokens: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.mean.dim() != 3 or self.second.shape != (*self.mean.shape, self.mean.shape[-1]):
            raise ShapeMismatchError(f"query moments need mean [L, Hq, D] and second [L, Hq, D, D], got "
                                     f"{tuple(self.mean.shape)} and {tuple(self.second.shape)}")
        if self.num_kv_heads <= 0 or self.mean.shape[1] % self.num_kv_heads:
            raise ShapeMismatchError(f"{self.mean.shape[1]} query heads cannot be grouped over "
                                     f"{self.num_kv_heads} KV heads")
        if self.tokens <= 0:
            raise ValueError(f"query moments need at least one calibration token, got {self.tokens}")
        self.mean = self.mean.to(torch.float64)
        self.second = self.second.to(torch.float64)

    @classmethod
    def from_statistics(cls, stats: Any, num_kv_heads: int) -> QueryMoments:
        """From a ``QueryStatistics`` (halves pooled) or a dict of its ``second_moment``/``query_sum``/``count``."""
        if isinstance(stats, dict):
            second, total, count = stats["second_moment"], stats["query_sum"], stats["count"]
        else:
            second, total, count = stats.second_moment.sum(0), stats.query_sum.sum(0), stats.count.sum(0)
        n = count.to(torch.float64).reshape(-1, 1, 1)  # [L, 1, 1] tokens per layer
        if bool((n <= 0).any()):
            raise ValueError("some layer saw no calibration query; calibrate on more text")
        return cls(mean=total / n, second=second / n[..., None], tokens=int(count.min()), num_kv_heads=num_kv_heads)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(num_layers, num_query_heads, head_dim)."""
        return tuple(self.mean.shape)  # type: ignore[return-value]

    @property
    def group(self) -> int:
        return self.mean.shape[1] // self.num_kv_heads

    def covariance(self) -> torch.Tensor:
        """Sigma = E[q q^T] - mu mu^T, symmetrised, [L, Hq, D, D] float64."""
        cov = self.second - self.mean[..., :, None] * self.mean[..., None, :]
        return (cov + cov.transpose(-1, -2)) / 2

    def covariance_factor(self, rank: int | None = None) -> torch.Tensor:
        """F [L, Hq, D, r] with F F^T the best rank-r approximation of Sigma (all of it when ``rank`` is None)."""
        evals, evecs = torch.linalg.eigh(self.covariance())  # ascending
        d = evals.shape[-1]
        r = d if rank is None else rank
        if not 1 <= r <= d:
            raise ValueError(f"rank must be in [1, {d}], got {rank}")
        evals, evecs = evals[..., d - r:].clamp_min(0), evecs[..., d - r:]
        return evecs * evals.sqrt()[..., None, :]

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        if (self.shape[0], self.num_kv_heads, self.shape[2]) != (num_layers, num_kv_heads, head_dim):
            raise ShapeMismatchError(
                f"query moments cover {self.shape[0]} layers x {self.num_kv_heads} KV heads x dim {self.shape[2]} "
                f"but the model has {(num_layers, num_kv_heads, head_dim)}; were they calibrated for another model?")


def save_moments(directory: str | os.PathLike[str], moments: QueryMoments) -> Path:
    """Add ``query_stats.safetensors`` to an existing artifact and record its sha256 in ``qfilters.json``.

    The public files are untouched apart from that one metadata key. Each file is replaced atomically
    (:mod:`qfilters.fileio`), the tensor file first: a crash between the two leaves a file whose sha256 the metadata
    does not record, which :func:`load_moments` refuses rather than trusts.
    """
    import safetensors.torch

    from qfilters.artifact import METADATA_NAME, sha256_file

    root = Path(directory)
    meta_path = root / METADATA_NAME
    if not meta_path.is_file():
        raise ArtifactError(root, f"has no {METADATA_NAME}; save the filters with QFilters.save_pretrained first")
    meta = json.loads(meta_path.read_text())
    if [meta.get("num_layers"), meta.get("kv_head_dim")] != [moments.shape[0], moments.shape[2]] or \
            meta.get("num_kv_heads") != moments.num_kv_heads:
        raise ShapeMismatchError(f"query moments {moments.shape} (kv heads {moments.num_kv_heads}) do not match the "
                                 f"artifact at {root}")
    tensors = {"mean": moments.mean.contiguous(), "second": moments.second.contiguous(),
               "tokens": torch.tensor([moments.tokens], dtype=torch.int64),
               "num_kv_heads": torch.tensor([moments.num_kv_heads], dtype=torch.int64)}
    with atomic_path(root / STATS_NAME) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
        meta[STATS_SHA_KEY] = sha256_file(tmp)
    atomic_write_text(meta_path, json.dumps(meta, sort_keys=True, indent=2, allow_nan=False) + "\n")
    return root / STATS_NAME


def load_moments(directory: str | os.PathLike[str]) -> QueryMoments | None:
    """The artifact's query moments, or None when it has none (kvpress / official artifacts, older ones).

    A file whose sha256 is missing from or disagrees with ``qfilters.json`` raises :class:`ArtifactError`.
    """
    import safetensors.torch

    from qfilters.artifact import METADATA_NAME, sha256_file

    root = Path(directory)
    path = root / STATS_NAME
    if not path.is_file():
        return None
    meta_path = root / METADATA_NAME
    expected = json.loads(meta_path.read_text()).get(STATS_SHA_KEY) if meta_path.is_file() else None
    if expected is None:
        raise ArtifactError(path, f"has no {STATS_SHA_KEY} in {METADATA_NAME} (the filters were re-saved after it); "
                                  "re-save the moments with qfilters.moments.save_moments")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(path, f"sha256 {actual} does not match {STATS_SHA_KEY} {expected} in {METADATA_NAME}: "
                                  "the file was modified or corrupted after saving")
    t = safetensors.torch.load_file(str(path))
    return QueryMoments(mean=t["mean"], second=t["second"], tokens=int(t["tokens"][0]),
                        num_kv_heads=int(t["num_kv_heads"][0]))
