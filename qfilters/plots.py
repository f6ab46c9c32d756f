"""``qfilters eval --plot``: the perplexity-vs-budget figure of an ``EvalResult`` (the report's figure, same look)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qfilters.evaluate import EvalResult


def plot_perplexity_vs_budget(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    """One line per policy over the KV budgets (log x), full cache as a dashed horizontal line; writes ``path``."""
    from qfilters.validation.figures import budget_plot

    series = {p: [(b, result.perplexity(p, b)) for b in result.budgets if (p, b) in result.nll]
              for p in result.policies}
    cfg = result.config
    model = str(cfg.get("model") or "model").split("/")[-1]
    png = budget_plot(
        series, result.full_perplexity,
        title=f"{model} on {cfg.get('corpus') or 'corpus'}: perplexity vs KV budget ({len(result.titles)} docs)",
        xlabel=f"KV budget per head (tokens, window {cfg.get('window')} included)",
        ylabel=f"perplexity (last {cfg.get('score_last')} of {cfg.get('seq_len')} tokens)",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png.data)
    return path
