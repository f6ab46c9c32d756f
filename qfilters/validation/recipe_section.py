"""The searched eviction recipe in a report: one table, in Markdown and in HTML, from the same rows.

Per budget: the recipe chosen on calibration text, its perplexity there next to StreamingLLM's, and on each held-out
evaluation dataset its gap ratio against StreamingLLM beside the stock Q-Filters' (below 1: it loses less).
"""

from __future__ import annotations

import html
import math

from qfilters.policy_table import RECIPE
from qfilters.validation.markdown import md, num, ppl_cell
from qfilters.validation.schema import ValidationReport

__all__ = ["recipe_markdown", "recipe_rows", "recipe_html"]


def _ratio(report: ValidationReport, dataset: int, policy: str, budget: int) -> float | None:
    ppl = report.perplexity[dataset]
    _, gap = ppl_cell(ppl, policy, budget)
    _, base = ppl_cell(ppl, "streamingllm", budget)
    if gap is None or base is None or base == 0 or not math.isfinite(gap):
        return None
    return gap / base


def recipe_rows(report: ValidationReport) -> tuple[list[str], list[list[str]]]:
    """Headers and plain-text cells of the recipe table (empty when no recipe was searched)."""
    if report.recipe is None:
        return [], []
    specs = [p.dataset.spec for p in report.perplexity]
    headers = ["Budget", "Chosen recipe", "Search text: recipe / StreamingLLM perplexity",
               *[f"{s}: gap ratio recipe (stock Q-Filters)" for s in specs]]
    rows = []
    for choice in report.recipe.chosen:
        cells = [str(choice.budget), choice.description,
                 f"{num(choice.search_perplexity, 2)} / {num(choice.search_streamingllm_perplexity, 2)}"]
        for i in range(len(specs)):
            ours, stock = (_ratio(report, i, p, choice.budget) for p in (RECIPE, "qfilters"))
            cells.append(f"{num(ours, 3)} ({num(stock, 3)})")
        rows.append(cells)
    return headers, rows


def _intro(report: ValidationReport) -> str:
    r = report.recipe
    assert r is not None
    return (f"Searched on {r.searched_on} only, never on evaluation text ({r.evaluations} one-pass evaluations; "
            f"full-cache perplexity there {num(r.search_full_perplexity, 2)}), at the same total KV memory as "
            "each budget. The chosen recipes are stored in the filters' qfilters.json: "
            "QFiltersCache(model, filters, budget=...) uses them unless given recipe=None.")


def recipe_markdown(report: ValidationReport) -> list[str]:
    headers, rows = recipe_rows(report)
    if not rows:
        return []
    lines = ["", "### Eviction recipe", "", md(_intro(report)), "",
             "| " + " | ".join(md(h) for h in headers) + " |", "| ---: | --- |" + " ---: |" * (len(headers) - 2)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return lines


def recipe_html(report: ValidationReport) -> str:
    headers, rows = recipe_rows(report)
    if not rows:
        return ""
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<section id="recipe"><h2>Eviction recipe</h2><p>{html.escape(_intro(report))}</p>'
            f'<div class="table-scroll"><table id="recipe-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div></section>")
