"""The validation report as a Markdown section for a Hugging Face model card, and the number formatting that the
HTML page shares with it.

The section is short: the verdict, the gates, the cross-dataset stability in one paragraph, perplexity at the
reference budget, the architecture warnings and how to load the filters. Text from the report is escaped so a dataset
spec can never inject Markdown or HTML into the card.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeGuard

from qfilters.policy_table import policy_label, policy_order
from qfilters.validation.schema import PerplexityReport, ValidationReport

COMPARISON_SIGNS = {">=": "\u2265", "<=": "\u2264", "<": "<", ">": ">"}
DEFAULT_REPO = "<repo id or directory of these filters>"


# -------------------------------------------------------------------------------------- shared formatting
def _finite(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: float | None, digits: int = 3, *, signed: bool = False) -> str:
    """A number for people: an em dash when absent, ``n/a`` when not finite."""
    if x is None:
        return "\u2014"
    if not _finite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def count(n: int | None) -> str:
    return "\u2014" if n is None else f"{n:,}"


def layer_ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0–2, 5, 7–8' ('none' when empty)."""
    items = sorted({int(i) for i in layers})
    out: list[str] = []
    start = 0
    for k in range(1, len(items) + 1):
        if k == len(items) or items[k] != items[k - 1] + 1:
            a, b = items[start], items[k - 1]
            out.append(str(a) if a == b else f"{a}\u2013{b}")
            start = k
    return ", ".join(out) if out else "none"


def gate_threshold(gate: object) -> str:
    """'≥ 0.9' when the gate says how it compares, else just the number."""
    sign = COMPARISON_SIGNS.get(getattr(gate, "comparison", None) or "", "")
    value = f"{gate.threshold:g}"  # type: ignore[attr-defined]
    return f"{sign} {value}" if sign else value


def ppl_cell(ppl: PerplexityReport, policy: str, budget: int | None) -> tuple[float | None, float | None]:
    """(perplexity, gap) of one policy at one budget (the full cache ignores the budget); (None, None) if absent."""
    for row in ppl.rows:
        if row.policy == policy and (policy == "full" or row.budget == budget):
            return row.perplexity, row.gap
    return None, None


# ---------------------------------------------------------------------------------------------- Markdown
_MD_SPECIAL = set("\\`*_[]<>|#~!")


def md(text: object) -> str:
    """User text as inert inline Markdown: one line, Markdown/HTML punctuation backslash-escaped, ``&`` as entity."""
    out = []
    for ch in " ".join(str(text).split()):
        if ch == "&":
            out.append("&amp;")
        elif ch in _MD_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


@dataclass(frozen=True)
class Section:
    """An optional titled table (the searched recipe, the passkey test), built once and rendered by both pages."""

    element_id: str
    title: str
    intro: str
    headers: list[str]
    rows: list[list[str]]  # plain text; each page escapes it
    numeric: frozenset[int]  # right-aligned columns
    findings: Sequence[str] = ()  # what to take away from the table, one paragraph each, after it


def section_markdown(section: Section | None) -> list[str]:
    if section is None:
        return []
    align = "|" + "".join(" ---: |" if i in section.numeric else " --- |" for i in range(len(section.headers)))
    return ["", f"### {section.title}", "", md(section.intro), "", _row([md(h) for h in section.headers]), align,
            *(_row([md(c) for c in row]) for row in section.rows),
            *(line for f in section.findings for line in ("", md(f)))]


def model_line(model_id: str, allocations: Iterable[str] = (), kv_heads: int | None = None) -> str:
    """The usage snippet's model load, given the recipe's allocations per budget: one that gives the KV heads of a
    layer different budgets (``head``, with more than one KV head per layer) needs sdpa, since its cache hides each
    head's padding with a per-head key mask that flash-attn kernels take no part of."""
    if kv_heads == 1 or "head" not in allocations:
        return f"model = AutoModelForCausalLM.from_pretrained({model_id!r})"
    return ("# the recipe gives each KV head its own budget: sdpa applies the per-head key mask, flash-attn cannot\n"
            f"model = AutoModelForCausalLM.from_pretrained({model_id!r}, attn_implementation='sdpa')")


def _fence(code: str, lang: str = "python") -> str:
    fence = "```"
    while fence in code:
        fence += "`"
    return f"{fence}{lang}\n{code}\n{fence}"


def render_markdown(report: ValidationReport, *, repo_id: str | None = None) -> str:
    """A model-card section (starts with a level-2 heading); ``repo_id`` goes into the loading snippets."""
    v = report.verdict
    s = report.settings
    passed = v.status == "pass"
    n_fail = sum(not g.passed for g in v.gates)
    lines = ["## Q-Filters validation", ""]
    if passed:
        lines.append(f"**Verdict: \u2705 PASS**: all {len(v.gates)} gates pass for `{_code(report.model_id)}` "
                     f"(qfilters {md(report.qfilters_version)}, {md(report.created_at)}).")
    else:
        lines.append(f"**Verdict: \u274c FAIL**: {n_fail} of {len(v.gates)} gates fail for "
                     f"`{_code(report.model_id)}` (qfilters {md(report.qfilters_version)}, {md(report.created_at)}).")
    if v.reasons:
        lines.append("")
        lines += [f"- {md(r)}" for r in v.reasons]
    if v.warnings:
        lines += ["", "> **Warnings**", ">"]
        lines += [f"> - {md(w)}" for w in v.warnings]
    lines += ["", _row(["Gate", "Threshold", "Measured", "Result"]), "| --- | ---: | ---: | :---: |"]
    for g in v.gates:
        lines.append(_row([f"`{_code(g.name, table=True)}`", md(gate_threshold(g)), num(g.value, 4),
                           "pass" if g.passed else "**FAIL**"]))

    # ---- stability
    st = report.stability
    sm = st.summary
    k = len(st.datasets)
    heads = [(layer, h) for layer, row in enumerate(st.per_head_min) for h, x in enumerate(row)
             if _finite(x) and x < sm.threshold]
    total = sum(len(r) for r in st.per_head_min)
    lines += ["", "### Cross-dataset stability", "",
              f"Filters calibrated separately on {k} datasets ({', '.join(f'`{_code(d)}`' for d in st.datasets)}) "
              f"agree head by head with a mean cosine of **{num(sm.mean, 4)}** (5th percentile {num(sm.p5, 4)}, "
              f"lowest {num(sm.min, 4)}); {num(100 * sm.share_above, 1)}% of (dataset pair, layer, KV head) are at "
              f"least {sm.threshold:g}. "
              + (f"{len(heads)} of {total} (layer, KV head) fall below {sm.threshold:g} for some pair: "
                 + ", ".join(f"L{layer}H{h}" for layer, h in heads[:12]) + (", ..." if len(heads) > 12 else "") + "."
                 if heads else f"Every (layer, KV head) stays at or above {sm.threshold:g}.")]
    if report.sampling:
        lines += ["", _row(["Calibration dataset", "Split-half cosine (lowest)", "Tokens to stable"]),
                  "| --- | ---: | ---: |"]
        for smp in report.sampling:
            stable = count(smp.tokens_to_stable) if smp.tokens_to_stable is not None else "not reached"
            lines.append(_row([f"`{_code(smp.dataset, table=True)}`", num(smp.split_half.min, 4), stable]))

    # ---- perplexity at the reference budget
    ref = s.reference_budget
    window = next((r.window for p in report.perplexity for r in p.rows if r.budget == ref and r.window is not None),
                  s.window)
    lines += ["", f"### Perplexity at a KV budget of {ref} tokens per head", "",
              f"Window of {window} recent tokens always kept ({s.n_sinks} sink tokens too for StreamingLLM); "
              f"perplexity of the last {s.score_last} tokens of {s.eval_seq_len}-token sequences. "
              "Cells: perplexity (gap vs full cache). "
              "Gap ratio below 1: Q-Filters lose less than StreamingLLM.", ""]
    policies = [p for p in policy_order(r.policy for p in report.perplexity for r in p.rows) if p != "full"]
    lines.append(_row(["Evaluation dataset", "Full cache", *[md(policy_label(p)) for p in policies],
                       "Gap ratio Q-Filters / StreamingLLM"]))
    lines.append("| --- | ---: |" + " ---: |" * len(policies) + " ---: |")
    for p in report.perplexity:
        cells = []
        for policy in policies:
            value, gap = ppl_cell(p, policy, ref)
            cells.append("\u2014" if value is None else f"{num(value, 2)} ({num(gap, 2, signed=True)})")
        ratio = p.gap_ratio_vs_streamingllm.get(str(ref))
        lines.append(_row([f"`{_code(p.dataset.spec, table=True)}`", num(p.full_perplexity, 2), *cells,
                           num(ratio, 3) if ratio is not None else "undefined"]))

    from qfilters.validation.passkey_check import passkey_section
    from qfilters.validation.recipe_section import recipe_section

    lines += section_markdown(recipe_section(report)) + section_markdown(passkey_section(report))

    # ---- architecture
    a = report.architecture
    lines += ["", "### Architecture notes", ""]
    lines.append(f"{md(a.model_type)}: {a.num_layers} layers, {a.num_kv_heads} KV heads of dimension {a.head_dim}; "
                 f"Q-Filters compress {len(a.compressed_layers)} of {a.num_layers} layers"
                 + (f" (sliding-window layers {layer_ranges(a.sliding_layers)} are not compressed)"
                    if a.sliding_layers else "") + ".")
    shown = set(v.warnings)
    if any(w not in shown for w in a.warnings):
        lines.append("")
        lines += [f"- \u26a0\ufe0f {md(w)}" for w in a.warnings if w not in shown]
    elif a.warnings:
        lines += ["", "Its risks are listed in the warnings under the verdict above."]
    else:
        lines += ["", "No architecture risk found (no QK-norm, no QKV bias, RoPE, full attention)."]

    # ---- how to use
    repo = repo_id or DEFAULT_REPO
    allocations = [str(c.recipe.get("allocation")) for c in report.recipe.chosen] if report.recipe is not None else []
    cache_line = (f"cache = QFiltersCache(model, filters, budget={ref})  # the searched recipe stored with the filters"
                  if report.recipe is not None else
                  f"cache = QFiltersCache(model, QFilterScorer(filters), budget={ref}, window={window}, "
                  f"n_sinks={s.n_sinks})")
    ours = (
        "from transformers import AutoModelForCausalLM\n"
        "from qfilters import QFilters, QFiltersCache, QFilterScorer\n\n"
        f"{model_line(report.model_id, allocations, report.architecture.num_kv_heads)}\n"
        f"filters = QFilters.from_pretrained({repo!r})\n"
        f"{cache_line}\n"
        "# transformers < 5.24: past_key_values=cache\n"
        "out = model.generate(input_ids, cache=cache, max_new_tokens=256)"
    )
    kvpress = (
        "from kvpress import QFilterPress\n"
        "from kvpress.presses.qfilter_press import QFilters\n\n"
        "class MyQFilterPress(QFilterPress):\n"
        "    def post_init_from_model(self, model):  # load these filters instead of nthngdy/<model>_qfilt\n"
        f"        self.q_filters = QFilters.from_pretrained({repo!r}).q_filters.to(model.dtype)\n\n"
        "press = MyQFilterPress(compression_ratio=0.5)"
    )
    lines += ["", "### Use these filters", "",
              "With `qfilters` (a KV cache for `model.generate()`):", "", _fence(ours), "",
              "With NVIDIA kvpress (`QFilterPress` reads the same `config.json` + `model.safetensors` format):", "",
              _fence(kvpress), ""]
    return "\n".join(lines)


def _code(text: object, *, table: bool = False) -> str:
    """User text inside an inline code span: one line, no backticks (they would end the span); in a table cell
    ``|`` is escaped, which GFM requires even inside code."""
    text = " ".join(str(text).split()).replace("`", "'") or " "
    return text.replace("|", "\\|") if table else text
