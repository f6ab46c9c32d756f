"""The library seam the worker pool relies on: per-dataset calibrations made apart (and stored as bytes in between)
give the very report and filters of a validation that calibrated in one process."""

from __future__ import annotations

import pytest

SETTINGS = dict(tokens_per_dataset=256, calib_seq_len=128, calib_batch_size=2, eval_seq_len=128, score_last=64,
                budgets=(48, 24), max_docs=2)
CALIB = ["python-code", "handbook:en"]
EVAL = ["python-code"]


def test_validation_over_stored_per_dataset_runs_equals_the_in_process_one(tiny_llama) -> None:
    from qfilters.calibrate import dump_result, load_result
    from qfilters.validation.run import ValidationSettings, calibrate_dataset, run_validation

    settings = ValidationSettings(**SETTINGS)
    whole = run_validation(tiny_llama, CALIB, EVAL, settings, created_at="t")
    stored = [dump_result(calibrate_dataset(tiny_llama, spec, settings)) for spec in CALIB]
    assert all(isinstance(b, bytes) for b in stored)
    split = run_validation(tiny_llama, CALIB, EVAL, settings, created_at="t",
                           calibrated=[load_result(b) for b in stored])
    assert split.report.artifact_sha256 == whole.report.artifact_sha256
    assert split.report.model_dump(mode="json") == whole.report.model_dump(mode="json")


def test_results_of_other_datasets_or_without_statistics_are_refused(tiny_llama) -> None:
    from qfilters.calibrate import CalibrationResult, dump_result, load_result
    from qfilters.errors import CalibrationError
    from qfilters.validation.gates import ValidationInputError
    from qfilters.validation.run import ValidationSettings, calibrate_dataset, run_validation

    settings = ValidationSettings(**SETTINGS)
    runs = [calibrate_dataset(tiny_llama, spec, settings) for spec in CALIB]
    with pytest.raises(ValidationInputError, match="given for dataset"):
        run_validation(tiny_llama, CALIB, EVAL, settings, calibrated=list(reversed(runs)))
    with pytest.raises(ValidationInputError, match="2 datasets"):
        run_validation(tiny_llama, CALIB, EVAL, settings, calibrated=runs[:1])
    with pytest.raises(CalibrationError, match="statistics"):
        dump_result(CalibrationResult(runs[0].filters))
    with pytest.raises(CalibrationError, match="cannot be read"):
        load_result(b"not a calibration result")
