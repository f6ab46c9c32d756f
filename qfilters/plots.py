"""Perplexity-vs-budget plot of an ``EvalResult`` (matplotlib, Agg canvas: no display, no global backend change)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_STYLE = {"qfilters": ("Q-Filters", "tab:red"), "knorm": ("K-norm", "tab:blue"),
          "streamingllm": ("StreamingLLM", "tab:green"), "random": ("Random", "tab:gray")}


def plot_perplexity_vs_budget(result: Any, path: str | os.PathLike[str]) -> Path:
    """One line per policy over the KV budgets (log x), full cache as a dashed horizontal line; writes ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    budgets = result.budgets
    for policy in result.policies:
        label, color = _STYLE.get(policy, (policy, None))
        xs = [b for b in budgets if (policy, b) in result.nll]
        ax.plot(xs, [result.perplexity(policy, b) for b in xs], marker="o", label=label, color=color)
    full = result.full_perplexity
    ax.axhline(full, linestyle="--", color="black", label=f"full cache ({full:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    cfg = result.config
    ax.set_xlabel(f"KV budget per head (tokens, window {cfg.get('window')} included)")
    ax.set_ylabel(f"perplexity (last {cfg.get('score_last')} of {cfg.get('seq_len')} tokens)")
    model = str(cfg.get("model") or "model").split("/")[-1]
    ax.set_title(f"{model} on {cfg.get('corpus') or 'corpus'}: perplexity vs KV budget ({len(result.titles)} docs)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
