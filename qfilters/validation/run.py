"""The validation engine: calibrate per dataset, combine, measure stability and perplexity, decide, report.

:func:`validate` checks every input first (settings, dataset specs, corpora non-empty and long enough, model
attention layers, the shape of an existing artifact) and only then starts forward passes, so a typo costs
milliseconds, not a calibration. Perplexities come from :func:`qfilters.evaluate.evaluate_policies`, the code path of
``qfilters eval``: the same settings give the same numbers.

Phases (``on_progress`` gets :class:`Progress` events for each):

1. ``calibrate``: one calibration run per calibration dataset (tokens);
2. ``evaluate``: the published filters (the exact union of the per-dataset runs, or ``filters`` when given) on every
   evaluation dataset, full cache vs Q-Filters / K-norm / StreamingLLM over the budget sweep;
3. ``transfer``: each per-dataset filter set on each evaluation dataset at the reference budget (the same
   per-document ``perplexity`` calls, pooled by the same ``EvalResult``, reusing the sweep's full-cache pass).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qfilters.validation.gates import GateInputs, ValidationInputError, decide, gap_ratio, parse_gate_overrides
from qfilters.validation.progress import Progress, ProgressFn, interruptible, notifier
from qfilters.validation.schema import (
    DatasetInfo,
    PerplexityReport,
    PolicyRow,
    SamplingStability,
    Settings,
    TransferMatrix,
    ValidationReport,
    rnd,
)

# stability and risk need torch: they load with the first validation, so that checking a request (check_settings,
# in a service's API process) never imports torch.
STABLE_THRESHOLD = 0.999  # checkpoint agreement that counts as "stable" (tokens_to_stable)
COMBINED = "combined"  # label of the published (union) filter set in the transfer matrix
EVAL_POLICIES = ("full", "qfilters", "knorm", "streamingllm")


@dataclass(frozen=True)
class ValidationSettings:
    """What to calibrate and evaluate, sized by default so that SmolLM2-135M on 5 + 2 datasets takes minutes on a
    laptop CPU (calibration ~ 400 tokens/s, one 1024-token evaluation pass ~ 1 s)."""

    tokens_per_dataset: int = 8192
    calib_seq_len: int = 1024
    calib_batch_size: int = 2
    checkpoint_every: int | None = None  # default: tokens_per_dataset // 4 (four checkpoints per dataset)
    seed: int = 0
    eval_seq_len: int = 1024
    score_last: int = 512
    budgets: tuple[int, ...] | None = None  # default: eval_seq_len / 4, / 8, / 16, / 32
    window: int = 64  # recent tokens always kept; at budget b the window is min(window, b // 2)
    n_sinks: int = 4  # StreamingLLM sinks
    reference_budget: int | None = None  # default: the budget closest to 16x compression (eval_seq_len / 16)
    max_docs: int | None = 6
    gates: Mapping[str, float] = field(default_factory=dict)  # overrides of the default gate thresholds

    def resolved_budgets(self) -> list[int]:
        budgets = list(self.budgets) if self.budgets else [self.eval_seq_len // d for d in (4, 8, 16, 32)]
        if self.reference_budget is not None and self.reference_budget not in budgets:
            budgets.append(self.reference_budget)
        return sorted(set(budgets), reverse=True)

    def resolved_reference_budget(self) -> int:
        if self.reference_budget is not None:
            return self.reference_budget
        target = self.eval_seq_len / 16
        return min(self.resolved_budgets(), key=lambda b: (abs(b - target), b))

    def resolved_checkpoint_every(self) -> int:
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return max(self.calib_seq_len * self.calib_batch_size, self.tokens_per_dataset // 4)

    def window_for(self, budget: int) -> int:
        """The recent-token window used at ``budget``: ``min(window, budget // 2)`` (recorded in every row)."""
        return min(self.window, budget // 2)




@dataclass
class ValidationRun:
    """Everything a validation produced: the report, the published filters, the per-dataset runs."""

    report: ValidationReport
    filters: Any  # QFilters: the published set (combined, or the given artifact)
    combined: Any  # QFilters: exact union of the per-dataset calibrations
    per_dataset: list[Any]  # CalibrationResult per calibration dataset, in order


# ---------------------------------------------------------------------------------------------------- input checks


def check_settings(s: ValidationSettings) -> dict[str, float]:
    """Raise :class:`ValidationInputError` on any inconsistent setting; return the gate thresholds."""
    ints = {
        "tokens_per_dataset": s.tokens_per_dataset, "calib_seq_len": s.calib_seq_len,
        "calib_batch_size": s.calib_batch_size, "eval_seq_len": s.eval_seq_len, "score_last": s.score_last,
    }
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValidationInputError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("window", s.window), ("n_sinks", s.n_sinks), ("seed", s.seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValidationInputError(f"{name} must be a non-negative integer, got {value!r}")
    if s.checkpoint_every is not None and s.checkpoint_every <= 0:
        raise ValidationInputError(f"checkpoint_every must be positive, got {s.checkpoint_every}")
    if s.max_docs is not None and s.max_docs <= 0:
        raise ValidationInputError(f"max_docs must be positive, got {s.max_docs}")
    if s.tokens_per_dataset < s.calib_seq_len:
        raise ValidationInputError(
            f"{s.tokens_per_dataset} calibration tokens per dataset is less than one {s.calib_seq_len}-token "
            "sequence: raise --tokens or lower --calib-seq-len"
        )
    if not 1 <= s.score_last <= s.eval_seq_len - 1:
        raise ValidationInputError(
            f"score_last ({s.score_last}) must be between 1 and eval_seq_len - 1 ({s.eval_seq_len - 1})"
        )
    for b in s.resolved_budgets():
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValidationInputError(f"budgets must be positive integers, got {b!r}")
        if b >= s.eval_seq_len:
            raise ValidationInputError(
                f"budget {b} is not below the evaluation length ({s.eval_seq_len} tokens): nothing would be evicted"
            )
        if b - s.window_for(b) <= s.n_sinks:
            raise ValidationInputError(
                f"budget {b} leaves no slot to choose: window {s.window_for(b)} + {s.n_sinks} StreamingLLM sinks "
                f"already take {s.window_for(b) + s.n_sinks} of its {b} slots; use budgets of at least "
                f"{2 * (s.n_sinks + 1)}"
            )
    return parse_gate_overrides(s.gates)


def _label(item: Any) -> str:
    return item if isinstance(item, str) else str(getattr(item, "spec", item))


def _load_corpora(items: Sequence[Any], role: str) -> list[Any]:
    """Specs (strings or parsed ``Spec`` objects, all parsed first, then fetched) or ready ``Corpus`` objects ->
    non-empty corpora. A service passes ``parse_spec(s, allow_local=False)`` results, so loading keeps that mode."""
    from qfilters.data import load_corpus, parse_spec
    from qfilters.data.spec import Spec

    if not items:
        raise ValidationInputError(f"no {role} dataset given")
    labels = [_label(x) for x in items]
    parsed = [parse_spec(x) if isinstance(x, str) else x for x in items]
    normalized = [str(x) if isinstance(x, Spec) else lbl for x, lbl in zip(parsed, labels)]
    dupes = sorted({n for n in normalized if normalized.count(n) > 1})
    if dupes:
        raise ValidationInputError(f"{role} dataset listed twice: {', '.join(dupes)}")
    corpora = [load_corpus(x) if isinstance(x, Spec) else x for x in parsed]
    for c in corpora:
        if len(c.documents) == 0 or not any(d.text.strip() for d in c.documents):
            raise ValidationInputError(f"{role} dataset {c.spec!r} is empty: it has no text to use")
    return corpora


def _check_calibration_text(lm: Any, corpora: Sequence[Any], s: ValidationSettings) -> None:
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


def _check_evaluation_text(lm: Any, corpora: Sequence[Any], s: ValidationSettings) -> None:
    from qfilters.evaluate import encode_document

    for c in corpora:
        if not any(len(encode_document(lm.tokenizer, d.text, s.eval_seq_len)) >= s.eval_seq_len
                   for d in c.documents):
            raise ValidationInputError(
                f"evaluation dataset {c.spec!r} has no document of {s.eval_seq_len} tokens: lower --eval-seq-len "
                "or choose longer documents"
            )


def _load_filters(filters: Any, lm: Any) -> Any:
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


# ---------------------------------------------------------------------------------------------------- the run


def validate(
    lm: Any,
    calibration: Sequence[Any],
    evaluation: Sequence[Any],
    settings: ValidationSettings = ValidationSettings(),
    *,
    filters: Any = None,
    on_progress: ProgressFn | None = None,
    created_at: str | None = None,
) -> ValidationReport:
    """Validate Q-Filters for ``lm`` (a ``LoadedModel``) and return the report (see :func:`run_validation`)."""
    return run_validation(lm, calibration, evaluation, settings, filters=filters, on_progress=on_progress,
                          created_at=created_at).report


def run_validation(
    lm: Any,
    calibration: Sequence[Any],
    evaluation: Sequence[Any],
    settings: ValidationSettings = ValidationSettings(),
    *,
    filters: Any = None,
    on_progress: ProgressFn | None = None,
    created_at: str | None = None,
    calibrated: Sequence[Any] | None = None,
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
    budgets = settings.resolved_budgets()
    reference = settings.resolved_reference_budget()
    notify, interrupt = notifier(on_progress)
    with interruptible(lm.model, interrupt):
        return _run(lm, calib_corpora, eval_corpora, settings, given, thresholds, budgets, reference, notify,
                    filters, created_at, calibrated)


def _run(lm: Any, calib_corpora: list[Any], eval_corpora: list[Any], settings: ValidationSettings, given: Any,
         thresholds: dict[str, float], budgets: list[int], reference: int, notify: ProgressFn, filters: Any,
         created_at: str | None, calibrated: Sequence[Any] | None) -> ValidationRun:
    import qfilters
    from qfilters.calibrate import combine_results
    from qfilters.validation.risk import assess
    from qfilters.validation.stability import cross_dataset_stability

    # ---- 2. calibration, one run per dataset, then their exact union
    if calibrated is not None:
        results = _check_calibrated(calibrated, calib_corpora, lm)
    else:
        results = [_calibrate_one(lm, corpus, settings, notify) for corpus in calib_corpora]
    combined = combine_results(lm, results)
    published = given if given is not None else combined
    calib_specs = [c.spec for c in calib_corpora]

    # ---- 3. stability (cross-dataset and within each dataset)
    stability = cross_dataset_stability(calib_specs, [r.filters for r in results],
                                         threshold=thresholds["cross_dataset_cosine"])
    sampling = [_sampling(spec, r, thresholds["split_half_min"]) for spec, r in zip(calib_specs, results)]

    # ---- 4. perplexity sweeps of the published filters, then the transfer matrix
    sweeps = [_sweep(lm, corpus, published, budgets, settings, notify) for corpus in eval_corpora]
    transfer = _transfer(lm, eval_corpora, results, sweeps, reference, settings, notify,
                         last_label=COMBINED if given is None else "given filters")

    # ---- 5. architecture risk, gates, verdict
    statistics = (published.provenance or {}).get("statistics") or combined.provenance["statistics"]
    architecture = assess(lm.info, lm.model, statistics)
    reports = [_perplexity_report(corpus, sweep, budgets, settings) for corpus, sweep in zip(eval_corpora, sweeps)]
    gate_inputs = GateInputs(
        cross_dataset_cosine=stability.summary.mean,
        reference_gaps=[(c.spec, s.gap("qfilters", reference), s.gap("streamingllm", reference),
                         s.gap("knorm", reference)) for c, s in zip(eval_corpora, sweeps)],
        split_half_min=[(s.dataset, s.split_half.min) for s in sampling],
        reference_budget=reference,
    )
    warnings = list(architecture.warnings) + _evaluation_warnings(reports, settings)
    verdict = decide(gate_inputs, thresholds, warnings)

    info = lm.info
    report = ValidationReport(
        created_at=created_at or _now(),
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
        ),
        calibration_datasets=[_calibration_info(r) for r in results],
        architecture=architecture,
        stability=stability,
        sampling=sampling,
        perplexity=reports,
        transfer=transfer,
        verdict=verdict,
        artifact_sha256=safetensors_sha256(published),
    )
    return ValidationRun(report=report, filters=published, combined=combined, per_dataset=results)


def calibration_config(settings: ValidationSettings) -> Any:
    """The ``CalibrationConfig`` of one per-dataset run of a validation with ``settings``."""
    from qfilters.calibrate import CalibrationConfig

    return CalibrationConfig(max_tokens=settings.tokens_per_dataset, seq_len=settings.calib_seq_len,
                             batch_size=settings.calib_batch_size, seed=settings.seed,
                             checkpoint_every=settings.resolved_checkpoint_every())


def _calibrate_one(lm: Any, corpus: Any, settings: ValidationSettings, notify: ProgressFn) -> Any:
    from qfilters.calibrate import calibrate

    def cal_progress(p: Any) -> None:
        notify(Progress("calibrate", corpus.spec, min(p.tokens, p.total_tokens), p.total_tokens,
                        f"{p.tokens_per_s:.0f} tok/s"))

    notify(Progress("calibrate", corpus.spec, 0, settings.tokens_per_dataset))
    return calibrate(lm, [corpus], calibration_config(settings), on_progress=cal_progress)


def calibrate_dataset(lm: Any, dataset: Any, settings: ValidationSettings = ValidationSettings(), *,
                      on_progress: ProgressFn | None = None) -> Any:
    """One per-dataset calibration run of a validation (checked first, as :func:`run_validation` checks it).

    Its result, handed back through ``run_validation(calibrated=...)``, gives the same report as a run that calibrated
    in-process: a worker pool uses this to calibrate the datasets of one job on different devices at once.
    """
    from qfilters.attention import attention_layers

    check_settings(settings)
    attention_layers(lm.model)
    (corpus,) = _load_corpora([dataset], "calibration")
    _check_calibration_text(lm, [corpus], settings)
    return _calibrate_one(lm, corpus, settings, on_progress or (lambda p: None))


def _check_calibrated(calibrated: Sequence[Any], corpora: Sequence[Any], lm: Any) -> list[Any]:
    """Precomputed runs must be of these datasets, in this order, for this model's shape, with their statistics."""
    if len(calibrated) != len(corpora):
        raise ValidationInputError(f"{len(calibrated)} calibration results given for {len(corpora)} datasets")
    for result, corpus in zip(calibrated, corpora):
        spec = _calibration_info(result).spec
        if spec != corpus.spec or result.statistics is None:
            raise ValidationInputError(f"calibration result of {spec!r} given for dataset {corpus.spec!r}, or it "
                                       "carries no statistics: calibrate it with calibrate_dataset")
        if result.filters.shape != lm.info.filter_shape:
            raise ValidationInputError(f"calibration result of {spec!r} has shape {list(result.filters.shape)}, "
                                       f"the model needs {list(lm.info.filter_shape)}")
    return list(calibrated)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _filters_label(filters: Any) -> str:
    if isinstance(filters, str):
        return filters
    return str(getattr(filters, "artifact_info", {}).get("tensor_sha256") or "in-memory filters")


def safetensors_sha256(filters: Any) -> str:
    """sha256 of the ``model.safetensors`` that ``save_pretrained`` writes for these filters (computed in memory)."""
    import safetensors.torch

    from qfilters.artifact import TENSOR_NAME

    data = safetensors.torch.save({TENSOR_NAME: filters.filters.detach().cpu().contiguous()})
    return hashlib.sha256(data).hexdigest()


def _calibration_info(result: Any) -> DatasetInfo:
    (ds,) = result.filters.provenance["calibration"]["datasets"]
    return DatasetInfo(spec=ds["spec"], sha256=ds["sha256"], source=ds["source"], documents=ds["documents"],
                       tokens=ds["tokens"])


def _sampling(spec: str, result: Any, threshold: float) -> SamplingStability:
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


# ---------------------------------------------------------------------------------------------------- perplexity


@dataclass
class Sweep:
    """One evaluation dataset, the published filters, all budgets.

    ``base`` is the ``evaluate_policies`` result of the largest group of budgets sharing one window (it fixes the
    documents and the full-cache pass); budgets with other windows are added by the same per-document ``perplexity``
    calls and pooled by the same ``EvalResult``, reusing that full-cache pass instead of recomputing it.
    """

    base: Any  # EvalResult
    chunks: list[Any]  # the evaluated token chunks, [1, seq_len] each, in document order
    results: dict[int, Any]  # budget -> EvalResult that holds it

    @property
    def first(self) -> Any:
        return self.base

    def perplexity(self, policy: str, budget: int) -> float:
        return self.results[budget].perplexity(policy, budget)

    def gap(self, policy: str, budget: int) -> float:
        return self.results[budget].gap(policy, budget)


def _evaluate(lm: Any, corpus: Any, filters: Any, budgets: list[int], window: int, s: ValidationSettings,
              policies: Sequence[str], on_step: Callable[[int, int], None]) -> Any:
    from qfilters.evaluate import evaluate_policies

    return evaluate_policies(lm.model, lm.tokenizer, corpus, filters, budgets=budgets, window=window,
                             seq_len=s.eval_seq_len, score_last=s.score_last, n_sinks_streaming=s.n_sinks,
                             policies=tuple(policies), max_docs=s.max_docs, progress=False,
                             model_id=lm.info.model_id, on_step=on_step)


def _selected_chunks(lm: Any, corpus: Any, s: ValidationSettings) -> tuple[list[str], list[Any]]:
    """The documents and token chunks ``evaluate_policies`` scores (same rule; checked against its titles)."""
    import torch

    from qfilters.evaluate import encode_document

    titles, chunks = [], []
    for doc in corpus.documents:
        if s.max_docs is not None and len(titles) >= s.max_docs:
            break
        ids = encode_document(lm.tokenizer, doc.text, s.eval_seq_len)
        if len(ids) < s.eval_seq_len:
            continue
        titles.append(doc.title)
        chunks.append(torch.tensor(ids, dtype=torch.long)[None])  # [1, seq_len], as evaluate_policies builds them
    return titles, chunks


def _extend(lm: Any, base: Any, chunks: Sequence[Any], filters: Any, policies: Sequence[str], budgets: Sequence[int],
            window: int, s: ValidationSettings, tick: Callable[[], None]) -> Any:
    """More policies / budgets on ``base``'s documents: ``evaluate_policies``' per-document calls (same scorers, same
    arguments), pooled by an ``EvalResult`` that shares ``base``'s full-cache pass."""
    from qfilters.evaluate import EvalResult, perplexity
    from qfilters.scorers import make_scorer

    nll: dict[tuple[str, int], list[float]] = {}
    for p in policies:
        kw = {"n_sinks": s.n_sinks} if p == "streamingllm" else {}
        scorer = make_scorer(p, filters if p == "qfilters" else None, **kw)
        for b in budgets:
            nll[p, b] = []
            for ids in chunks:
                nll[p, b].append(perplexity(lm.model, ids, scorer, b, window, score_last=s.score_last).nll_sum)
                tick()
    return EvalResult(config={**base.config, "budgets": sorted(budgets), "window": window,
                              "policies": ["full", *policies]},
                      titles=list(base.titles), full_nll=list(base.full_nll), nll=nll,
                      tokens_per_doc=base.tokens_per_doc, skipped=list(base.skipped))


def _window_groups(budgets: Sequence[int], s: ValidationSettings) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for b in budgets:
        groups.setdefault(s.window_for(b), []).append(b)
    return groups


def _sweep(lm: Any, corpus: Any, filters: Any, budgets: list[int], s: ValidationSettings,
           notify: ProgressFn) -> Sweep:
    policies = [p for p in EVAL_POLICIES if p != "full"]
    groups = _window_groups(budgets, s)
    base_window = max(groups, key=lambda w: (len(groups[w]), w))  # the largest group goes through evaluate_policies
    titles, chunks = _selected_chunks(lm, corpus, s)
    n_budgets = len(budgets)
    total = len(chunks) * (1 + len(policies) * n_budgets)
    done = len(chunks) * (1 + len(policies) * len(groups[base_window]))
    notify(Progress("evaluate", corpus.spec, 0, total, f"budgets {', '.join(map(str, groups[base_window]))}"))
    # one event per forward pass: a caller's callback is where it can stop a long sweep between two passes
    base = _evaluate(lm, corpus, filters, groups[base_window], base_window, s, EVAL_POLICIES,
                     on_step=lambda passes, _: notify(Progress("evaluate", corpus.spec, passes, total)))
    if base.titles != titles:  # pragma: no cover - would mean evaluate_policies changed its selection rule
        raise RuntimeError(f"selected documents {titles} differ from the evaluated ones {base.titles}")
    results = {b: base for b in groups[base_window]}

    def tick() -> None:
        nonlocal done
        done += 1
        notify(Progress("evaluate", corpus.spec, done, total))

    for window, group in groups.items():
        if window != base_window:
            extra = _extend(lm, base, chunks, filters, policies, group, window, s, tick)
            results.update({b: extra for b in group})
    return Sweep(base=base, chunks=chunks, results=results)


def _perplexity_report(corpus: Any, sweep: Sweep, budgets: list[int], s: ValidationSettings) -> PerplexityReport:
    first = sweep.first
    full = first.full_perplexity
    rows = [PolicyRow(policy="full", budget=None, window=None, perplexity=rnd(full), gap=0.0)]
    ratios: dict[str, float | None] = {}
    for b in budgets:
        for policy in ("qfilters", "knorm", "streamingllm"):
            rows.append(PolicyRow(policy=policy, budget=b, window=s.window_for(b),
                                  perplexity=rnd(sweep.perplexity(policy, b)), gap=rnd(sweep.gap(policy, b))))
        ratios[str(b)] = rnd(gap_ratio(sweep.gap("qfilters", b), sweep.gap("streamingllm", b)))
    return PerplexityReport(
        dataset=DatasetInfo(spec=corpus.spec, sha256=corpus.sha256, source=corpus.source,
                            documents=len(first.titles), tokens=first.tokens_per_doc * len(first.titles)),
        seq_len=s.eval_seq_len,
        score_last=s.score_last,
        documents_skipped=len(first.skipped),
        full_perplexity=rnd(full),
        rows=rows,
        gap_ratio_vs_streamingllm=ratios,
    )


def _transfer(lm: Any, eval_corpora: Sequence[Any], results: Sequence[Any], sweeps: Sequence[Sweep],
              reference: int, s: ValidationSettings, notify: ProgressFn, last_label: str) -> TransferMatrix:
    """Filters of calibration dataset i (rows; last row: the published set, already in the sweeps) on dataset j."""
    window = s.window_for(reference)
    chunks = [sweep.chunks for sweep in sweeps]
    total = len(results) * sum(len(c) for c in chunks)
    done = 0
    label = "transfer matrix"
    notify(Progress("transfer", label, 0, total))
    ppl: list[list[float]] = []
    ratio: list[list[float | None]] = []
    for r in results:
        row_ppl, row_ratio = [], []
        for corpus, sweep, docs in zip(eval_corpora, sweeps, chunks):
            detail = f"{_calibration_info(r).spec} -> {corpus.spec}"

            def tick(detail: str = detail) -> None:
                nonlocal done
                done += 1
                notify(Progress("transfer", label, done, total, detail))

            cell = _extend(lm, sweep.base, docs, r.filters, ("qfilters",), [reference], window, s, tick)
            row_ppl.append(rnd(cell.perplexity("qfilters", reference)))
            row_ratio.append(rnd(gap_ratio(cell.gap("qfilters", reference), sweep.gap("streamingllm", reference))))
        ppl.append(row_ppl)
        ratio.append(row_ratio)
    ppl.append([rnd(sw.perplexity("qfilters", reference)) for sw in sweeps])
    ratio.append([rnd(gap_ratio(sw.gap("qfilters", reference), sw.gap("streamingllm", reference))) for sw in sweeps])
    return TransferMatrix(
        budget=reference,
        window=window,
        calibration=[_calibration_info(r).spec for r in results] + [last_label],
        evaluation=[c.spec for c in eval_corpora],
        perplexity=ppl,
        gap_ratio_vs_streamingllm=ratio,
    )


def _evaluation_warnings(reports: Sequence[PerplexityReport], s: ValidationSettings) -> list[str]:
    out = []
    for r in reports:
        if r.documents_skipped:
            out.append(f"{r.documents_skipped} document(s) of {r.dataset.spec} are shorter than {s.eval_seq_len} "
                       "tokens and were not evaluated.")
        if r.dataset.documents < 3:
            out.append(f"Only {r.dataset.documents} document(s) of {r.dataset.spec} were evaluated: its "
                       "perplexities are noisy.")
        worse = [b for b, x in r.gap_ratio_vs_streamingllm.items() if x is not None and x > 1.0]
        if worse:
            out.append(f"On {r.dataset.spec}, Q-Filters lose more perplexity than StreamingLLM at budget(s) "
                       f"{', '.join(worse)}.")
    return out
