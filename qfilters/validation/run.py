"""The validation engine: calibrate per dataset, combine, measure stability and perplexity, decide, report.

:func:`validate` checks every input first (settings, dataset specs, corpora non-empty and long enough, model
attention layers, the shape of an existing artifact) and only then starts forward passes, so a typo costs
milliseconds, not a calibration. Perplexities come from :func:`qfilters.evaluate.evaluate_chunks`, the engine of
``qfilters eval``: the same settings give the same numbers.

Phases (``on_progress`` gets :class:`Progress` events for each):

1. ``calibrate``: one calibration run per calibration dataset (tokens);
2. ``evaluate``: the published filters (the exact union of the per-dataset runs, or ``filters`` when given) on every
   evaluation dataset, full cache vs Q-Filters / K-norm / StreamingLLM over the budget sweep;
3. ``transfer``: each per-dataset filter set on each evaluation dataset at the reference budget (the same engine,
   reusing the sweep's full-cache pass).

Settings live in :mod:`~qfilters.validation.settings`, calibration in :mod:`~qfilters.validation.calibration`,
perplexity in :mod:`~qfilters.validation.sweeps`; this module checks the inputs and puts the report together.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from qfilters.policy_table import RECIPE
from qfilters.validation.calibration import (
    calibrate_one,
    calibration_config,
    check_calibrated,
    dataset_info,
    sampling_stability,
)
from qfilters.validation.gates import GateInputs, ValidationInputError, decide
from qfilters.validation.passkey_check import passkey_warnings, run_passkey_check, shipped_accuracy
from qfilters.validation.progress import Progress, ProgressFn, interruptible, notifier
from qfilters.validation.recipe_search import recipe_policies, recipe_report, recipe_warnings, search_recipes
from qfilters.validation.schema import Settings, ValidationReport
from qfilters.validation.settings import ValidationSettings, check_settings
from qfilters.validation.sweeps import evaluation_warnings, perplexity_report, run_sweep, run_transfer

if TYPE_CHECKING:
    from qfilters.artifact import QFilters
    from qfilters.calibrate import CalibrationResult
    from qfilters.data import Corpus
    from qfilters.data.spec import Spec
    from qfilters.models import LoadedModel

__all__ = ["Progress", "ValidationRun", "ValidationSettings", "calibrate_dataset", "calibration_config",
           "check_settings", "run_validation", "safetensors_sha256", "validate"]

# stability and risk need torch: they load with the first validation, so that checking a request (check_settings,
# in a service's API process) never imports torch.
COMBINED = "combined"  # label of the published (union) filter set in the transfer matrix
DatasetLike = Union[str, "Spec", "Corpus"]  # a spec string, a parsed spec, or a loaded corpus
FiltersLike = Union["QFilters", str, None]  # filters in memory, a directory or Hub id, or None (calibrate them)


@dataclass
class ValidationRun:
    """Everything a validation produced: the report, the published filters, the per-dataset runs."""

    report: ValidationReport
    filters: QFilters  # the published set (combined, or the given artifact)
    combined: QFilters  # exact union of the per-dataset calibrations
    per_dataset: list[CalibrationResult]  # one per calibration dataset, in order


# ---------------------------------------------------------------------------------------------------- input checks


def _label(item: DatasetLike) -> str:
    return item if isinstance(item, str) else str(getattr(item, "spec", item))


def _load_corpora(items: Sequence[DatasetLike], role: str) -> list[Corpus]:
    """Specs (strings or parsed ``Spec`` objects, all parsed first, then fetched) or ready ``Corpus`` objects ->
    non-empty corpora. A service passes ``parse_spec(s, allow_local=False)`` results, so loading keeps that mode."""
    from qfilters.data import load_corpus, parse_spec
    from qfilters.data.spec import Spec

    if not items:
        raise ValidationInputError(f"no {role} dataset given")
    labels = [_label(x) for x in items]
    parsed = [parse_spec(x) if isinstance(x, str) else x for x in items]
    normalized = [str(x) if isinstance(x, Spec) else lbl for x, lbl in zip(parsed, labels, strict=True)]
    dupes = sorted({n for n in normalized if normalized.count(n) > 1})
    if dupes:
        raise ValidationInputError(f"{role} dataset listed twice: {', '.join(dupes)}")
    corpora = [load_corpus(x) if isinstance(x, Spec) else x for x in parsed]
    for c in corpora:
        if len(c.documents) == 0 or not any(d.text.strip() for d in c.documents):
            raise ValidationInputError(f"{role} dataset {c.spec!r} is empty: it has no text to use")
    return corpora


def _check_calibration_text(lm: LoadedModel, corpora: Sequence[Corpus], s: ValidationSettings) -> None:
    from qfilters.data import iter_token_chunks

    for c in corpora:
        n = 0
        for chunk in iter_token_chunks(lm.tokenizer, c, s.calib_seq_len, s.tokens_per_dataset):
            n += len(chunk)
            if n >= s.calib_seq_len:
                break
        if n < s.calib_seq_len:
            raise ValidationInputError(
                f"calibration dataset {c.spec!r} has only {n} tokens, less than one {s.calib_seq_len}-token "
                "sequence: use more text or lower --calib-seq-len"
            )


def _check_evaluation_text(lm: LoadedModel, corpora: Sequence[Corpus], s: ValidationSettings,
                           role: str = "evaluation dataset") -> None:
    from qfilters.data.chunks import encode_document

    for c in corpora:
        if not any(len(encode_document(lm.tokenizer, d.text, s.eval_seq_len)) >= s.eval_seq_len
                   for d in c.documents):
            raise ValidationInputError(
                f"{role} {c.spec!r} has no document of {s.eval_seq_len} tokens: lower --eval-seq-len "
                "or choose longer documents"
            )


def _check_search_text(lm: LoadedModel, calib: Sequence[Corpus], evaluation: Sequence[Corpus],
                       s: ValidationSettings) -> None:
    """The recipe search reads calibration text only, in ``eval_seq_len`` chunks: refuse what would break either."""
    shared = sorted({c.spec for c in calib} & {c.spec for c in evaluation})
    if shared:
        raise ValidationInputError(f"--search-recipe searches on calibration text and is checked on evaluation text: "
                                   f"{', '.join(shared)} cannot be both")
    _check_evaluation_text(lm, calib, s, role="calibration dataset (searched for a recipe)")


def _check_passkey_filler(lm: LoadedModel, filler: Corpus, s: ValidationSettings) -> None:
    from qfilters.passkey import make_trials

    try:  # tokenizing only: the trials are drawn again, identically, when the test runs
        make_trials(lm.tokenizer, "\n".join(d.text for d in filler.documents), s.passkey_trials,
                    s.resolved_passkey_context(), s.seed)
    except ValueError as e:
        raise ValidationInputError(f"passkey test on {filler.spec!r} (the first evaluation dataset): {e}; set "
                                   "--passkey-context within those bounds or evaluate on longer text") from e


def _load_filters(filters: FiltersLike, lm: LoadedModel) -> QFilters | None:
    from qfilters.artifact import QFilters

    if filters is None or isinstance(filters, QFilters):
        if filters is not None and filters.shape != lm.info.filter_shape:
            from qfilters.errors import ShapeMismatchError

            raise ShapeMismatchError(
                f"filters have shape {list(filters.shape)} [num_layers, num_kv_heads, head_dim] but "
                f"{lm.info.model_id} needs {list(lm.info.filter_shape)}; they were calibrated for a different model"
            )
        return filters
    return QFilters.from_pretrained(str(filters), expected_shape=lm.info.filter_shape)


def _query_moments(filters: FiltersLike, given: QFilters | None, results: Sequence[CalibrationResult],
                   lm: LoadedModel) -> Any:
    """The query moments behind the published filters, for the moment scorers' passkey rows: the validation's own
    calibration, or the given artifact directory's optional statistics file; None when there are none."""
    from qfilters.moments import QueryMoments, load_moments

    if given is None:
        from qfilters.query_stats import QueryStatistics

        stats = [r.statistics for r in results if r.statistics is not None]
        return QueryMoments.from_statistics(QueryStatistics.merged(stats), lm.info.num_kv_heads) if stats else None
    if isinstance(filters, (str, os.PathLike)) and Path(filters).is_dir():
        return load_moments(filters)
    return None


# ---------------------------------------------------------------------------------------------------- the run


def validate(
    lm: LoadedModel,
    calibration: Sequence[DatasetLike],
    evaluation: Sequence[DatasetLike],
    settings: ValidationSettings = ValidationSettings(),
    *,
    filters: FiltersLike = None,
    on_progress: ProgressFn | None = None,
    created_at: str | None = None,
) -> ValidationReport:
    """Validate Q-Filters for ``lm`` (a ``LoadedModel``) and return the report (see :func:`run_validation`)."""
    return run_validation(lm, calibration, evaluation, settings, filters=filters, on_progress=on_progress,
                          created_at=created_at).report


def run_validation(
    lm: LoadedModel,
    calibration: Sequence[DatasetLike],
    evaluation: Sequence[DatasetLike],
    settings: ValidationSettings = ValidationSettings(),
    *,
    filters: FiltersLike = None,
    on_progress: ProgressFn | None = None,
    created_at: str | None = None,
    calibrated: Sequence[CalibrationResult] | None = None,
) -> ValidationRun:
    """Calibrate on each of ``calibration`` (specs or ``Corpus``), evaluate on ``evaluation``, decide.

    ``filters`` (a ``QFilters``, a directory or a Hub id) validates an existing artifact instead of the combined
    filters: the per-dataset calibrations still run (they measure stability), the perplexity sweep uses ``filters``.
    ``calibrated`` gives the per-dataset runs already made (by :func:`calibrate_dataset`, elsewhere: a worker pool
    calibrates datasets on different devices), one per calibration dataset in order; they are not run again.
    """
    from qfilters.attention import attention_layers

    # ---- 1. everything that can be wrong is checked before the first forward pass
    thresholds = check_settings(settings)
    attention_layers(lm.model)  # ModelError if the model has none we can observe
    given = _load_filters(filters, lm)
    if len(calibration) < 2:
        raise ValidationInputError(
            "cross-dataset stability needs at least two calibration datasets (e.g. handbook:en and python-code)"
        )
    calib_corpora = _load_corpora(calibration, "calibration")
    eval_corpora = _load_corpora(evaluation, "evaluation")
    _check_calibration_text(lm, calib_corpora, settings)
    _check_evaluation_text(lm, eval_corpora, settings)
    if settings.search_recipe:
        _check_search_text(lm, calib_corpora, eval_corpora, settings)
    if settings.passkey_trials:
        _check_passkey_filler(lm, eval_corpora[0], settings)
    budgets = settings.resolved_budgets()
    reference = settings.resolved_reference_budget()
    created_at = created_at or _now()  # when the run started (SOURCE_DATE_EPOCH, if set, is checked here)
    notify, interrupt = notifier(on_progress)
    with interruptible(lm.model, interrupt):
        return _run(lm, calib_corpora, eval_corpora, settings, given, thresholds, budgets, reference, notify,
                    filters, created_at, calibrated)


def _run(lm: LoadedModel, calib_corpora: list[Corpus], eval_corpora: list[Corpus], settings: ValidationSettings,
         given: QFilters | None, thresholds: dict[str, float], budgets: list[int], reference: int,
         notify: ProgressFn, filters: FiltersLike, created_at: str,
         calibrated: Sequence[CalibrationResult] | None) -> ValidationRun:
    import qfilters
    from qfilters.calibrate import combine_results
    from qfilters.validation.risk import assess
    from qfilters.validation.stability import cross_dataset_stability

    # ---- 2. calibration, one run per dataset, then their exact union
    if calibrated is not None:
        results = check_calibrated(calibrated, calib_corpora, lm)
    else:
        results = [calibrate_one(lm, corpus, settings, notify) for corpus in calib_corpora]
    combined = combine_results(lm, results)
    published = given if given is not None else combined
    calib_specs = [c.spec for c in calib_corpora]

    # ---- 2b. the eviction recipe, searched on calibration text only, shipped with the published filters
    search = None
    if settings.search_recipe:
        search = search_recipes(lm, calib_corpora, published, budgets, settings, notify)
        published = published.with_recipe(search.book)
    extra = (recipe_policies(published.recipe, published, lm.model, budgets, settings.eval_seq_len)
             if published.recipe is not None else None)

    # ---- 3. stability (cross-dataset and within each dataset)
    stability = cross_dataset_stability(calib_specs, [r.filters for r in results],
                                         threshold=thresholds["cross_dataset_cosine"])
    sampling = [sampling_stability(spec, r, thresholds["split_half_min"])
                for spec, r in zip(calib_specs, results, strict=True)]

    # ---- 4. perplexity sweeps of the published filters, then the transfer matrix
    sweeps = [run_sweep(lm, corpus, published, budgets, settings, notify, extra) for corpus in eval_corpora]
    transfer = run_transfer(lm, results, sweeps, reference, settings, notify,
                            last_label=COMBINED if given is None else "given filters")

    # ---- 5. architecture risk, gates, verdict
    statistics = (published.provenance or {}).get("statistics") or combined.provenance["statistics"]
    architecture = assess(lm.info, lm.model, statistics)
    reports = [perplexity_report(sweep, budgets, settings) for sweep in sweeps]
    shipped = RECIPE if published.recipe is not None else "qfilters"
    passkey = (run_passkey_check(lm, eval_corpora[0], published, budgets, settings, notify,
                                 _query_moments(filters, given, results, lm))
               if settings.passkey_trials else None)
    gate_inputs = GateInputs(
        cross_dataset_cosine=stability.summary.mean,
        reference_gaps=[(c.spec, s.gap("qfilters", reference), s.gap("streamingllm", reference),
                         s.gap("knorm", reference)) for c, s in zip(eval_corpora, sweeps, strict=True)],
        split_half_min=[(s.dataset, s.split_half.min) for s in sampling],
        reference_budget=reference,
        passkey=None if passkey is None else shipped_accuracy(passkey, reference, shipped),
    )
    warnings = (list(architecture.warnings) + evaluation_warnings(reports, settings) + recipe_warnings(reports)
                + passkey_warnings(passkey, shipped))
    verdict = decide(gate_inputs, thresholds, warnings)

    info = lm.info
    report = ValidationReport(
        created_at=created_at,
        qfilters_version=qfilters.__version__,
        model_id=info.model_id,
        model_revision=info.revision,
        model_source=info.source,
        settings=Settings(
            calibration=calib_specs,
            evaluation=[c.spec for c in eval_corpora],
            tokens_per_dataset=settings.tokens_per_dataset,
            calib_seq_len=settings.calib_seq_len,
            seed=settings.seed,
            eval_seq_len=settings.eval_seq_len,
            score_last=settings.score_last,
            budgets=budgets,
            window=settings.window,
            n_sinks=settings.n_sinks,
            reference_budget=reference,
            max_docs=settings.max_docs,
            gates=thresholds,
            calib_batch_size=settings.calib_batch_size,
            checkpoint_every=settings.resolved_checkpoint_every(),
            filters=None if filters is None else _filters_label(filters),
            search_recipe=settings.search_recipe,
            recipe_docs=settings.recipe_docs,
            passkey_trials=settings.passkey_trials,
        ),
        calibration_datasets=[dataset_info(r) for r in results],
        architecture=architecture,
        stability=stability,
        sampling=sampling,
        perplexity=reports,
        transfer=transfer,
        verdict=verdict,
        artifact_sha256=safetensors_sha256(published),
        recipe=None if search is None else recipe_report(search),
        passkey=passkey,
    )
    return ValidationRun(report=report, filters=published, combined=combined, per_dataset=results)


def calibrate_dataset(lm: LoadedModel, dataset: DatasetLike, settings: ValidationSettings = ValidationSettings(), *,
                      on_progress: ProgressFn | None = None) -> CalibrationResult:
    """One per-dataset calibration run of a validation (checked first, as :func:`run_validation` checks it).

    Its result, handed back through ``run_validation(calibrated=...)``, gives the same report as a run that calibrated
    in-process: a worker pool uses this to calibrate the datasets of one job on different devices at once.
    """
    from qfilters.attention import attention_layers

    check_settings(settings)
    attention_layers(lm.model)
    (corpus,) = _load_corpora([dataset], "calibration")
    _check_calibration_text(lm, [corpus], settings)
    return calibrate_one(lm, corpus, settings, on_progress or (lambda p: None))


def _now() -> str:
    """The report's timestamp: now, or ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) when set, so two
    runs of the same inputs write the same report JSON byte for byte."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        if not epoch.isdigit():
            raise ValidationInputError(f"SOURCE_DATE_EPOCH must be a whole number of seconds, got {epoch!r}")
        moment = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
    else:
        moment = _dt.datetime.now(_dt.timezone.utc)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _filters_label(filters: FiltersLike) -> str:
    if isinstance(filters, str):
        return filters
    return str(getattr(filters, "artifact_info", {}).get("tensor_sha256") or "in-memory filters")


def safetensors_sha256(filters: QFilters) -> str:
    """sha256 of the ``model.safetensors`` that ``save_pretrained`` writes for these filters (computed in memory)."""
    import safetensors.torch

    from qfilters.artifact import TENSOR_NAME

    data = safetensors.torch.save({TENSOR_NAME: filters.filters.detach().cpu().contiguous()})
    return hashlib.sha256(data).hexdigest()
