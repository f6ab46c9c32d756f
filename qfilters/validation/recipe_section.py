"""The searched eviction recipe in a report: one table, rendered in Markdown and in HTML from the same rows.

Per budget: the recipe chosen on calibration text, its perplexity there next to StreamingLLM's, and on each held-out
evaluation dataset its gap ratio against StreamingLLM beside the stock Q-Filters' (below 1: it loses less).
"""

from __future__ import annotations

from qfilters.policy_table import RECIPE
from qfilters.validation.gates import gap_ratio
from qfilters.validation.markdown import Section, num, ppl_cell
from qfilters.validation.recipe_search import GATE_PERPLEXITY_TOLERANCE, RECALL_TRIALS
from qfilters.validation.schema import RecipeChoice, ValidationReport

__all__ = ["recipe_rows", "recipe_section"]


def _ratio(report: ValidationReport, dataset: int, policy: str, budget: int) -> float | None:
    ppl = report.perplexity[dataset]
    _, gap = ppl_cell(ppl, policy, budget)
    _, base = ppl_cell(ppl, "streamingllm", budget)
    return None if gap is None or base is None else gap_ratio(gap, base)


def recipe_rows(report: ValidationReport) -> tuple[list[str], list[list[str]]]:
    """Headers and plain-text cells of the recipe table (empty when no recipe was searched)."""
    if report.recipe is None:
        return [], []
    specs = [p.dataset.spec for p in report.perplexity]
    gated = any(c.search_passkey is not None for c in report.recipe.chosen)
    headers = ["Budget", "Chosen recipe", "Search text: recipe / StreamingLLM perplexity",
               *(["Search text: needles (key log-prob) recipe / StreamingLLM"] if gated else []),
               *[f"{s}: gap ratio recipe (stock Q-Filters)" for s in specs]]
    rows = []
    for choice in report.recipe.chosen:
        cells = [str(choice.budget), choice.description,
                 f"{num(choice.search_perplexity, 2)} / {num(choice.search_streamingllm_perplexity, 2)}"]
        if gated:
            logprob = (f" ({num(choice.search_key_logprob, 2)} / {num(choice.search_streamingllm_key_logprob, 2)})"
                       if choice.search_key_logprob is not None else "")  # older reports have the counts only
            cells.append(f"{choice.search_passkey} / {choice.search_streamingllm_passkey}{logprob}"
                         if choice.search_passkey is not None else "n/a")
        for i in range(len(specs)):
            ours, stock = (_ratio(report, i, p, choice.budget) for p in (RECIPE, "qfilters"))
            cells.append(f"{num(ours, 3)} ({num(stock, 3)})")
        rows.append(cells)
    return headers, rows


def _convergence(chosen: list[RecipeChoice]) -> str:
    """Whether each budget's coordinate search settled (a pass changed nothing) or was stopped by the pass cap, in
    which case another pass might have chosen differently; empty for reports written before this was recorded."""
    known = [c for c in chosen if c.search_converged is not None]
    if not known:
        return ""
    stopped = [c for c in known if not c.search_converged]
    passes = ", ".join(f"{c.budget}: {c.search_passes}" for c in known)
    if not stopped:
        return f" The search settled at every budget (a full pass over the axes changed nothing; passes {passes})."
    return (f" At budget(s) {', '.join(str(c.budget) for c in stopped)} the search hit its cap of "
            f"{max(c.search_passes or 0 for c in stopped)} passes while still moving (passes {passes}): another pass "
            "might choose a different recipe there.")


def _lost(c: RecipeChoice) -> bool:
    """Whether the shipped recipe lost the retrieval gate to StreamingLLM (by key log-probability; older reports: by
    needles found)."""
    if c.search_key_logprob is not None and c.search_streamingllm_key_logprob is not None:
        return c.search_key_logprob <= c.search_streamingllm_key_logprob
    return (c.search_passkey is not None and c.search_streamingllm_passkey is not None
            and c.search_passkey <= c.search_streamingllm_passkey)


def recipe_section(report: ValidationReport) -> Section | None:
    """The recipe table of both report pages; None when no recipe was searched."""
    r = report.recipe
    if r is None:
        return None
    headers, rows = recipe_rows(report)
    intro = (f"Searched on {r.searched_on} only, never on evaluation text ({r.evaluations} one-pass evaluations; "
             f"full-cache perplexity there {num(r.search_full_perplexity, 2)}), at the same total KV memory as "
             "each budget. The chosen recipes are stored in the filters' qfilters.json: "
             "QFiltersCache(model, filters, budget=...) uses them unless given recipe=None.")
    intro += _convergence(r.chosen)
    if r.recall_heads:
        heads = ", ".join(f"layer {i} head {h} ({a:.2f})" for i, h, a in r.recall_heads)
        intro += (" Recall heads: the KV heads whose attention, while a passkey is answered, falls most on its needle "
                  f"({RECALL_TRIALS} passkeys in calibration text; the top {len(r.recall_heads)}: {heads}); a "
                  "recipe's recall heads rank old keys by novelty alone.")
    gate = r.retrieval_gate
    if gate is not None and gate.skipped is None:
        intro += (f" Retrieval gate: {gate.trials} passkeys in {gate.context_tokens}-token contexts of {gate.filler} "
                  "(calibration text); among the candidates within "
                  f"{GATE_PERPLEXITY_TOLERANCE:.0%} of the best search perplexity, the one whose keys are most likely "
                  "(mean log-probability of the key's tokens), if more likely than StreamingLLM's; else the best by "
                  "perplexity.")
        failed = [c for c in r.chosen if _lost(c)]
        if failed:
            best = []
            for c in failed:
                if c.search_key_logprob_candidates:
                    label, value = max(c.search_key_logprob_candidates.items(), key=lambda x: (x[1], x[0]))
                    best.append(f"{c.budget}: most likely keys {label} {value:.2f} against StreamingLLM's "
                                f"{c.search_streamingllm_key_logprob:.2f}")
                elif c.search_passkey_candidates:  # older reports counted needles only
                    label, found = max(c.search_passkey_candidates.items(), key=lambda x: (x[1], x[0]))
                    best.append(f"{c.budget}: best candidate {label} {found}/{gate.trials} against StreamingLLM's "
                                f"{c.search_streamingllm_passkey}/{gate.trials}")
            intro += (f" At budget(s) {', '.join(str(c.budget) for c in failed)} no candidate beat StreamingLLM there"
                      + (f" ({'; '.join(best)})" if best else "") + ": the recipe shipped is the perplexity winner, "
                      "and retrieval suffers (see the passkey section).")
    elif gate is not None:
        intro += f" The retrieval gate did not run: {gate.skipped}."
    return Section("recipe", "Eviction recipe", intro, headers, rows,
                   numeric=frozenset(i for i in range(len(headers)) if i != 1))
