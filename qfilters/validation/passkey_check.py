"""The validator's retrieval test: passkey accuracy under compression, per policy and budget, and its report tables.

A five-digit key is hidden at a seeded depth of held-out filler (the first evaluation dataset's text); the context is
compressed once, then the question is asked (:mod:`qfilters.passkey`, the kvpress protocol). Perplexity can look fine
while a static score evicts exactly the needle: this is what tells a user before they deploy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qfilters.policy_table import FULL, policy_label, policy_order
from qfilters.validation.progress import Progress, ProgressFn

if TYPE_CHECKING:
    from qfilters.data import Corpus
    from qfilters.models import LoadedModel
    from qfilters.validation.markdown import Section
    from qfilters.validation.schema import PasskeyReport, ValidationReport
    from qfilters.validation.settings import ValidationSettings

__all__ = ["passkey_section", "run_passkey_check", "shipped_accuracy"]


def run_passkey_check(lm: LoadedModel, filler: Corpus, filters: Any, budgets: Sequence[int],
                      settings: ValidationSettings, notify: ProgressFn) -> PasskeyReport:
    """Full cache, StreamingLLM, K-norm, Q-Filters, the searched recipe (if any) and the SnapKV reference."""
    from qfilters.passkey import make_trials, run_passkey, standard_policies
    from qfilters.validation.schema import PasskeyCell, PasskeyReport, rnd

    context = settings.resolved_passkey_context()
    text = "\n".join(d.text for d in filler.documents)
    trials = make_trials(lm.tokenizer, text, settings.passkey_trials, context, settings.seed)
    policies = standard_policies(lm.model, sorted(budgets), settings.window, filters, context_length=context)
    label = f"{settings.passkey_trials} needles in {filler.spec}"
    notify(Progress("passkey", label, 0, len(trials)))
    run = run_passkey(lm.model, trials, policies,
                      progress=lambda done: notify(Progress("passkey", label, done, len(trials))))
    rows = []
    for key, hits in run.hits.items():
        name, _, budget = key.partition("@")
        rows.append(PasskeyCell(policy=name, budget=int(budget) if budget else None, correct=sum(hits),
                                accuracy=rnd(run.accuracy(key))))
    return PasskeyReport(filler=filler.spec, trials=len(trials), context_tokens=context, seed=settings.seed,
                         rows=rows)


def shipped_accuracy(report: PasskeyReport, budget: int, shipped: str) -> tuple[str, float, float] | None:
    """(shipped policy, its accuracy, StreamingLLM's) at ``budget``, for the gate."""
    cells = {(c.policy, c.budget): c.accuracy for c in report.rows}
    if (shipped, budget) not in cells or ("streamingllm", budget) not in cells:
        return None
    return shipped, cells[shipped, budget], cells["streamingllm", budget]


def passkey_section(report: ValidationReport) -> Section | None:
    """The passkey table of both report pages; None when the test did not run."""
    from qfilters.validation.markdown import Section

    pk = report.passkey
    if pk is None:
        return None
    budgets = sorted({c.budget for c in pk.rows if c.budget is not None})
    cells = {(c.policy, c.budget): f"{c.correct}/{pk.trials}" for c in pk.rows}
    full = cells.get((FULL, None), "\u2014")
    rows = [[policy_label(FULL), *[full] * len(budgets)]]
    rows += [[policy_label(name), *[cells.get((name, b), "\u2014") for b in budgets]]
             for name in policy_order(c.policy for c in pk.rows) if name != FULL]
    intro = (f"{pk.trials} five-digit keys hidden at seeded depths of {pk.context_tokens}-token contexts of "
             f"{pk.filler} text; the context is compressed once, then the question is asked (kvpress protocol). "
             "Cells: keys reproduced exactly. The SnapKV-like reference needs attention weights.")
    return Section("passkey", "Retrieval under compression (passkey)", intro,
                   ["Policy", *[f"budget {b}" for b in budgets]], rows, numeric=frozenset(range(1, len(budgets) + 1)))
