"""The validator's perplexity measurements: a budget sweep per evaluation dataset and the transfer matrix.

Both are lists of eviction policies handed to the one evaluation engine (:func:`qfilters.evaluate.evaluate_chunks`),
so the numbers are those of ``qfilters eval`` with the same settings. At budget ``b`` every policy keeps a window of
``settings.window_for(b)`` recent tokens; StreamingLLM's sinks are its scorer's (``settings.n_sinks``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qfilters.policy_table import ScorerInputs, build_scorer, compared_policies
from qfilters.validation.gates import gap_ratio
from qfilters.validation.progress import Progress, ProgressFn
from qfilters.validation.schema import DatasetInfo, PerplexityReport, PolicyRow, TransferMatrix, rnd

if TYPE_CHECKING:
    from qfilters.calibrate import CalibrationResult
    from qfilters.data import Corpus
    from qfilters.data.chunks import EvalChunks
    from qfilters.evaluate import EvalResult
    from qfilters.models import LoadedModel
    from qfilters.policy import EvictionPolicy, PolicyLike
    from qfilters.validation.settings import ValidationSettings

__all__ = ["Sweep", "evaluation_warnings", "perplexity_report", "run_sweep", "run_transfer", "sweep_policies"]

QFILTERS, BASELINE = "qfilters", "streamingllm"  # the comparison the gates and ratios are about


@dataclass
class Sweep:
    """One evaluation dataset: its chunks and every compared policy x budget, with the full cache."""

    corpus: Corpus
    chunks: EvalChunks
    result: EvalResult

    def perplexity(self, policy: str, budget: int) -> float:
        return self.result.perplexity(policy, budget)

    def gap(self, policy: str, budget: int) -> float:
        return self.result.gap(policy, budget)


def sweep_policies(filters: Any, budgets: Sequence[int], settings: ValidationSettings,
                   names: Sequence[str] | None = None) -> dict[tuple[str, int], EvictionPolicy]:
    """The policy table's comparison (Q-Filters with ``filters``, K-norm, StreamingLLM ...) at every budget;
    ``names`` picks some of them (the recipe search scores StreamingLLM exactly as the sweep does)."""
    from qfilters.policy import EvictionPolicy

    inputs = ScorerInputs(filters=filters, n_sinks=settings.n_sinks)
    scorers = {name: build_scorer(name, inputs) for name in (compared_policies() if names is None else names)}
    return {(name, b): EvictionPolicy(scorer, b, settings.window_for(b)) for name, scorer in scorers.items()
            for b in budgets}


def run_sweep(lm: LoadedModel, corpus: Corpus, filters: Any, budgets: Sequence[int], settings: ValidationSettings,
              notify: ProgressFn, extra: Mapping[tuple[str, int], PolicyLike] | None = None) -> Sweep:
    """Full cache and every compared policy at every budget on ``corpus``'s evaluation chunks; one event per pass.

    ``extra`` adds rows measured the same way (the searched recipe's, at every budget)."""
    from qfilters.data.chunks import select_chunks
    from qfilters.evaluate import evaluate_chunks

    chunks = select_chunks(lm.tokenizer, corpus, settings.eval_seq_len, settings.max_docs)
    policies: dict[tuple[str, int], PolicyLike] = {**sweep_policies(filters, budgets, settings), **(extra or {})}
    total = len(chunks) * (1 + len(policies))
    notify(Progress("evaluate", corpus.spec, 0, total, f"budgets {', '.join(map(str, budgets))}"))
    # one event per forward pass: a caller's callback is where it can stop a long sweep between two passes
    result = evaluate_chunks(lm.model, chunks, policies, score_last=settings.score_last,
                             config={"model": lm.info.model_id, "corpus": corpus.spec},
                             on_step=lambda done, _: notify(Progress("evaluate", corpus.spec, done, total)))
    return Sweep(corpus=corpus, chunks=chunks, result=result)


def perplexity_report(sweep: Sweep, budgets: Sequence[int], settings: ValidationSettings) -> PerplexityReport:
    result, corpus = sweep.result, sweep.corpus
    full = result.full_perplexity
    rows = [PolicyRow(policy="full", budget=None, window=None, perplexity=rnd(full), gap=0.0)]
    ratios: dict[str, float | None] = {}
    names = [*compared_policies(), *(p for p in result.policies if p not in compared_policies())]
    for b in budgets:
        for policy in names:
            window = settings.window_for(b) if policy in compared_policies() else None  # a recipe: per layer
            rows.append(PolicyRow(policy=policy, budget=b, window=window,
                                  perplexity=rnd(sweep.perplexity(policy, b)), gap=rnd(sweep.gap(policy, b))))
        ratios[str(b)] = rnd(gap_ratio(sweep.gap(QFILTERS, b), sweep.gap(BASELINE, b)))
    return PerplexityReport(
        dataset=DatasetInfo(spec=corpus.spec, sha256=corpus.sha256, source=corpus.source,
                            documents=len(result.titles), tokens=result.tokens_per_doc * len(result.titles)),
        seq_len=settings.eval_seq_len,
        score_last=settings.score_last,
        documents_skipped=len(result.skipped),
        full_perplexity=rnd(full),
        rows=rows,
        gap_ratio_vs_streamingllm=ratios,
    )


def run_transfer(lm: LoadedModel, results: Sequence[CalibrationResult], sweeps: Sequence[Sweep], reference: int,
                 settings: ValidationSettings, notify: ProgressFn, last_label: str) -> TransferMatrix:
    """Filters of calibration dataset i (rows; last row: the published set, already in the sweeps) on dataset j,
    at the reference budget, reusing each sweep's full-cache pass."""
    from qfilters.evaluate import evaluate_chunks
    from qfilters.policy import EvictionPolicy
    from qfilters.validation.calibration import dataset_info

    window = settings.window_for(reference)
    total = len(results) * sum(len(sw.chunks) for sw in sweeps)
    done, label = 0, "transfer matrix"
    notify(Progress("transfer", label, 0, total))
    ppl: list[list[float]] = []
    ratio: list[list[float | None]] = []
    for r in results:
        scorer = build_scorer(QFILTERS, ScorerInputs(filters=r.filters))
        row_ppl, row_ratio = [], []
        for sweep in sweeps:
            detail = f"{dataset_info(r).spec} -> {sweep.corpus.spec}"

            def tick(*_: int, detail: str = detail) -> None:
                nonlocal done
                done += 1
                notify(Progress("transfer", label, done, total, detail))

            cell = evaluate_chunks(lm.model, sweep.chunks,
                                   {(QFILTERS, reference): EvictionPolicy(scorer, reference, window)},
                                   score_last=settings.score_last, full_nll=sweep.result.full_nll, on_step=tick)
            row_ppl.append(rnd(cell.perplexity(QFILTERS, reference)))
            row_ratio.append(rnd(gap_ratio(cell.gap(QFILTERS, reference), sweep.gap(BASELINE, reference))))
        ppl.append(row_ppl)
        ratio.append(row_ratio)
    ppl.append([rnd(sw.perplexity(QFILTERS, reference)) for sw in sweeps])
    ratio.append([rnd(gap_ratio(sw.gap(QFILTERS, reference), sw.gap(BASELINE, reference))) for sw in sweeps])
    return TransferMatrix(
        budget=reference,
        window=window,
        calibration=[dataset_info(r).spec for r in results] + [last_label],
        evaluation=[sw.corpus.spec for sw in sweeps],
        perplexity=ppl,
        gap_ratio_vs_streamingllm=ratio,
    )


def evaluation_warnings(reports: Sequence[PerplexityReport], settings: ValidationSettings) -> list[str]:
    out = []
    for r in reports:
        if r.documents_skipped:
            out.append(f"{r.documents_skipped} document(s) of {r.dataset.spec} are shorter than "
                       f"{settings.eval_seq_len} tokens and were not evaluated.")
        if r.dataset.documents < 3:
            out.append(f"Only {r.dataset.documents} document(s) of {r.dataset.spec} were evaluated: its "
                       "perplexities are noisy.")
        worse = [b for b, x in r.gap_ratio_vs_streamingllm.items() if x is not None and x > 1.0]
        if worse:
            out.append(f"On {r.dataset.spec}, Q-Filters lose more perplexity than StreamingLLM at budget(s) "
                       f"{', '.join(worse)}.")
    return out
