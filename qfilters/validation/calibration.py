"""The validator's calibration side: one calibration run per dataset, its provenance, its sampling stability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from qfilters.validation.gates import ValidationInputError
from qfilters.validation.progress import Progress, ProgressFn
from qfilters.validation.schema import DatasetInfo, SamplingStability, rnd
from qfilters.validation.settings import ValidationSettings

if TYPE_CHECKING:
    from qfilters.calibrate import CalibrationConfig, CalibrationResult
    from qfilters.data import Corpus
    from qfilters.models import LoadedModel

__all__ = ["STABLE_THRESHOLD", "calibrate_one", "calibration_config", "check_calibrated", "dataset_info",
           "sampling_stability"]

STABLE_THRESHOLD = 0.999  # checkpoint agreement that counts as "stable" (tokens_to_stable)


def calibration_config(settings: ValidationSettings) -> CalibrationConfig:
    """The ``CalibrationConfig`` of one per-dataset run of a validation with ``settings``."""
    from qfilters.calibrate import CalibrationConfig

    return CalibrationConfig(max_tokens=settings.tokens_per_dataset, seq_len=settings.calib_seq_len,
                             batch_size=settings.calib_batch_size, seed=settings.seed,
                             checkpoint_every=settings.resolved_checkpoint_every())


def calibrate_one(lm: LoadedModel, corpus: Corpus, settings: ValidationSettings, notify: ProgressFn
                  ) -> CalibrationResult:
    from qfilters.calibrate import calibrate

    def cal_progress(p: Any) -> None:
        notify(Progress("calibrate", corpus.spec, min(p.tokens, p.total_tokens), p.total_tokens,
                        f"{p.tokens_per_s:.0f} tok/s"))

    notify(Progress("calibrate", corpus.spec, 0, settings.tokens_per_dataset))
    return calibrate(lm, [corpus], calibration_config(settings), on_progress=cal_progress)


def check_calibrated(calibrated: Sequence[CalibrationResult], corpora: Sequence[Corpus], lm: LoadedModel
                     ) -> list[CalibrationResult]:
    """Precomputed runs must be of these datasets, in this order, for this model's shape, with their statistics."""
    if len(calibrated) != len(corpora):
        raise ValidationInputError(f"{len(calibrated)} calibration results given for {len(corpora)} datasets")
    for result, corpus in zip(calibrated, corpora, strict=True):
        spec = dataset_info(result).spec
        if spec != corpus.spec or result.statistics is None:
            raise ValidationInputError(f"calibration result of {spec!r} given for dataset {corpus.spec!r}, or it "
                                       "carries no statistics: calibrate it with calibrate_dataset")
        if result.filters.shape != lm.info.filter_shape:
            raise ValidationInputError(f"calibration result of {spec!r} has shape {list(result.filters.shape)}, "
                                       f"the model needs {list(lm.info.filter_shape)}")
    return list(calibrated)


def dataset_info(result: CalibrationResult) -> DatasetInfo:
    """The calibration dataset of a one-dataset run, as its provenance records it."""
    (ds,) = result.filters.provenance["calibration"]["datasets"]
    return DatasetInfo(spec=ds["spec"], sha256=ds["sha256"], source=ds["source"], documents=ds["documents"],
                       tokens=ds["tokens"])


def sampling_stability(spec: str, result: CalibrationResult, threshold: float) -> SamplingStability:
    """Split-half agreement and convergence checkpoints of one calibration run."""
    import torch

    from qfilters.validation.stability import summarize, tokens_to_stable

    split = torch.tensor(result.filters.provenance["statistics"]["split_half_cosine"], dtype=torch.float64)
    checkpoints = [{k: (rnd(v) if isinstance(v, float) else v) for k, v in asdict(cp).items()}
                   for cp in result.checkpoints]
    return SamplingStability(
        dataset=spec,
        split_half=summarize(split, threshold),
        checkpoints=checkpoints,
        tokens_to_stable=tokens_to_stable(checkpoints, STABLE_THRESHOLD),
        stable_threshold=STABLE_THRESHOLD,
    )


