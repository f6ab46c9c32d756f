"""The validation report as one self-contained HTML page: inline CSS, figures as PNG data URIs, no script.

Every string that comes from the report (dataset specs, model ids, warnings) is escaped, and rendering is
deterministic: the same report gives the same bytes. Figures are drawn by ``qfilters.validation.figures``; the
Markdown form of the same report is ``qfilters.validation.markdown``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape

from qfilters.policy_table import policy_label, policy_order
from qfilters.validation import figures
from qfilters.validation.html_style import CSS
from qfilters.validation.markdown import (
    Section,
    _finite,
    count,
    gate_threshold,
    layer_ranges,
    num,
    ppl_cell,
)
from qfilters.validation.passkey_check import passkey_section
from qfilters.validation.recipe_section import recipe_section
from qfilters.validation.schema import ValidationReport

__all__ = ["CSS", "render_html"]


def _e(text: object) -> str:
    return escape(str(text), quote=True)


# ------------------------------------------------------------------------------------------------------ HTML


def _img(png: figures.Png, element_id: str, alt: str, caption: str) -> str:
    data = base64.b64encode(png.data).decode("ascii")
    return (f'<figure id="{element_id}" class="figure">'
            f'<img id="{element_id}-img" src="data:image/png;base64,{data}" width="{png.width}" '
            f'height="{png.height}" alt="{_e(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, table_id: str = "",
           numeric: Iterable[int] = (), row_classes: Sequence[str] | None = None,
           column_class: dict[int, str] | None = None) -> str:
    """Headers and cells are already-escaped HTML; the first cell of each row is a row header."""
    numeric_set = set(numeric)
    column_class = column_class or {}

    def cls(i: int) -> str:
        names = " ".join(n for n in ("num" if i in numeric_set else "", column_class.get(i, "")) if n)
        return f' class="{names}"' if names else ""

    head = "".join(f'<th scope="col"{cls(i)}>{h}</th>' for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        rc = row_classes[r] if row_classes and r < len(row_classes) else ""
        cells = "".join(f'<th scope="row"{cls(i)}>{c}</th>' if i == 0 else f"<td{cls(i)}>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f'<tr class="{rc}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    attrs = f' id="{table_id}"' if table_id else ""
    return (f'<div class="table-scroll"><table{attrs}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _verdict(report: ValidationReport) -> str:
    v = report.verdict
    passed = v.status == "pass"
    n_pass = sum(g.passed for g in v.gates)
    line = (f"All {len(v.gates)} gates pass: these filters can be published." if passed
            else f"{len(v.gates) - n_pass} of {len(v.gates)} gates fail: do not publish these filters as they are.")
    parts = [f'<section id="verdict" class="verdict verdict-{"pass" if passed else "fail"}" '
             f'data-status="{"pass" if passed else "fail"}" aria-label="Verdict">',
             '<div class="verdict-head">',
             f'<p id="verdict-status" class="verdict-status">{"PASS" if passed else "FAIL"}</p>',
             f'<p class="verdict-line">{_e(line)}</p></div>']
    if v.reasons:
        parts.append('<ul id="verdict-reasons" class="reasons">'
                     + "".join(f"<li>{_e(r)}</li>" for r in v.reasons) + "</ul>")
    if v.warnings:
        parts.append('<div id="verdict-warnings" class="warnings" role="note"><h3>Warnings</h3><ul>'
                     + "".join(f"<li>{_e(w)}</li>" for w in v.warnings) + "</ul></div>")
    rows = []
    classes = []
    for g in v.gates:
        badge = (f'<span class="badge badge-{"pass" if g.passed else "fail"}">'
                 f'{"PASS" if g.passed else "FAIL"}</span>')
        rows.append([f"<code>{_e(g.name)}</code>", _e(g.description), _e(gate_threshold(g)),
                     _e(num(g.value, 4)), badge])
        classes.append("gate-pass" if g.passed else "gate-fail")
    parts.append(_table(["Gate", "What it checks", "Threshold", "Measured", "Result"], rows, table_id="gates",
                        numeric=(2, 3), row_classes=classes))
    parts.append("</section>")
    return "".join(parts)


def _summary(report: ValidationReport) -> str:
    s = report.settings
    a = report.architecture
    model = [
        ("Model", f"<code>{_e(report.model_id)}</code>"),
        ("Revision", f"<code>{_e(report.model_revision)}</code>" if report.model_revision else "\u2014"),
        ("Loaded from", _e(report.model_source)),
        ("Shape", _e(f"{a.model_type}: {a.num_layers} layers, {a.num_attention_heads} query heads, "
                     f"{a.num_kv_heads} KV heads, head dim {a.head_dim}")),
        ("Filters", (f"<code>{_e(getattr(s, 'filters', None))}</code> (existing artifact)"
                     if getattr(s, "filters", None) else "combined calibration over all calibration datasets")),
        ("Artifact sha256", f"<code>{_e(report.artifact_sha256)}</code>" if report.artifact_sha256 else "\u2014"),
        ("Report", _e(f"qfilters {report.qfilters_version}, created {report.created_at}, "
                      f"schema {report.schema_version}")),
    ]
    checkpoint_every = getattr(s, "checkpoint_every", None)
    settings = [
        ("Calibration", _e(f"{len(s.calibration)} datasets, {count(s.tokens_per_dataset)} tokens each, "
                           f"sequences of {s.calib_seq_len}, seed {s.seed}"
                           + (f", checkpoint every {count(checkpoint_every)} tokens" if checkpoint_every else ""))),
        ("Evaluation", _e(f"{len(s.evaluation)} datasets, sequences of {s.eval_seq_len} tokens, perplexity of the "
                          f"last {s.score_last}" + (f", at most {s.max_docs} documents" if s.max_docs else ""))),
        ("KV budgets", _e(", ".join(str(b) for b in s.budgets) + " tokens per head")),
        ("Reference budget", _e(f"{s.reference_budget} tokens (gates are read here)")),
        ("Always kept", _e(f"the last {s.window} tokens (window; at most half the budget: see each budget's window) "
                           f"and the first {s.n_sinks} (sinks, StreamingLLM only)")),
        ("Gate thresholds", _e(", ".join(f"{k} {v:g}" for k, v in s.gates.items()) or "\u2014")),
    ]

    def dl(items: Sequence[tuple[str, str]]) -> str:
        return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"

    return (f'<section id="summary"><h2>Model and settings</h2><div class="columns">'
            f"<div><h3>Model</h3>{dl(model)}</div><div><h3>Settings</h3>{dl(settings)}</div></div></section>")


def _threshold(report: ValidationReport) -> float:
    return float(report.stability.summary.threshold)


def _stability(report: ValidationReport) -> str:
    st = report.stability
    sm = st.summary
    t = _threshold(report)
    a = report.architecture
    sliding = list(a.sliding_layers)
    k = len(st.datasets)
    parts = ['<section id="stability"><h2>Cross-dataset stability</h2>',
             f'<p class="summary-line">Filters were calibrated separately on each of the {k} calibration datasets '
             f"and compared head by head (cosine between the filters of the same layer and KV head; 1 = same "
             f"direction). Over all {k * (k - 1) // 2} pairs of datasets and all (layer, KV head): mean "
             f"<b>{num(sm.mean, 4)}</b>, 5th percentile <b>{num(sm.p5, 4)}</b>, lowest <b>{num(sm.min, 4)}</b>; "
             f"<b>{num(100 * sm.share_above, 1)}%</b> are at least {t:g}.</p>"]
    parts.append(_img(figures.cosine_matrices(st), "cosine-matrix",
                      f"{k} by {k} heatmaps of the mean and lowest cosine between filters calibrated on each pair "
                      "of datasets",
                      "Each cell compares the filters calibrated on the row dataset with those calibrated on the "
                      "column dataset. Left: mean over all (layer, KV head); right: the worst (layer, KV head). "
                      "Colours use a stretched scale where 0.9, 0.99 and 0.999 are equally spaced."))
    below = sorted(((v, layer, h) for layer, row in enumerate(st.per_head_min) for h, v in enumerate(row)
                    if _finite(v) and v < t))
    total = sum(len(r) for r in st.per_head_min)
    sliding_note = (f" Grey layer numbers ({_e(layer_ranges(sliding))}) are sliding-window layers, which Q-Filters "
                    "do not compress." if sliding else "")
    parts.append(_img(figures.head_heatmap(st, t, sliding), "head-heatmap",
                      "Heatmap of the lowest cross-dataset cosine for every layer and KV head",
                      f"Lowest cosine over all pairs of calibration datasets for each layer (columns) and KV head "
                      f"(rows). Red boxes mark the {len(below)} of {total} heads below {t:g}: their filter changes "
                      f"direction with the calibration text.{sliding_note}"))
    if below:
        shown = ", ".join(f"layer {layer} head {h} ({num(v, 3)})" for v, layer, h in below[:24])
        more = f", and {len(below) - 24} more" if len(below) > 24 else ""
        parts.append(f'<p id="heads-below" class="small"><b>Heads below {t:g}</b>, worst first: '
                     f"{_e(shown + more)}.</p>")
    else:
        parts.append(f'<p id="heads-below" class="small good">Every (layer, KV head) stays at or above {t:g} '
                     "across all dataset pairs.</p>")
    parts.append(_img(figures.layer_curves(st, t, sliding), "layer-curves",
                      "Per-layer mean and lowest cross-dataset cosine",
                      "Per layer: the mean cosine over dataset pairs and KV heads, and the lowest (layer, KV head). "
                      f"Dashed line: {t:g}."))
    parts.append("</section>")
    return "".join(parts)


def _sampling(report: ValidationReport) -> str:
    parts = ['<section id="sampling"><h2>Sampling stability</h2>',
             "<p>How much the filters move with the sample inside one dataset: filters from two halves of the "
             "sample (split-half), and the agreement of each convergence checkpoint with the previous one. If "
             "these are lower than the cross-dataset cosines above, differences between datasets are sampling "
             "noise.</p>"]
    if not report.sampling:
        parts.append('<p class="muted">No sampling statistics in this report.</p></section>')
        return "".join(parts)
    gate = report.settings.gates.get("split_half_min")
    rows = []
    for s in report.sampling:
        last = s.checkpoints[-1] if s.checkpoints and isinstance(s.checkpoints[-1], dict) else {}
        stable = (f'<span class="good">{count(s.tokens_to_stable)}</span>' if s.tokens_to_stable is not None
                  else '<span class="bad">not reached</span>')
        split_cls = "bad" if gate is not None and _finite(s.split_half.min) and s.split_half.min < gate else ""
        rows.append([f"<code>{_e(s.dataset)}</code>", _e(count(last.get("tokens"))),
                     _e(num(s.split_half.mean, 4)),
                     f'<span class="{split_cls}">{_e(num(s.split_half.min, 4))}</span>' if split_cls
                     else _e(num(s.split_half.min, 4)),
                     _e(num(last.get("agreement_min"), 4)), _e(f"{s.stable_threshold:g}"), stable])
    parts.append(_table(["Calibration dataset", "Tokens", "Split-half mean", "Split-half lowest",
                         "Agreement at last checkpoint", "Stable at", "Tokens to stable"], rows,
                        table_id="sampling-table", numeric=(1, 2, 3, 4, 5, 6)))
    png = figures.sampling_curves(report.sampling, gate)
    if png is not None:
        parts.append(_img(png, "sampling-curves", "Convergence of the filters during calibration, per dataset",
                          "Left: lowest cosine over (layer, KV head) between consecutive checkpoints; the filters "
                          "are stable once it stays above the dashed line. Right: lowest split-half cosine as the "
                          "sample grows" + (f"; dashed line: the gate ({gate:g})." if gate is not None else ".")))
    parts.append("</section>")
    return "".join(parts)


def _perplexity(report: ValidationReport) -> str:
    ref = report.settings.reference_budget
    parts = ['<section id="perplexity"><h2>Perplexity under compression</h2>',
             "<p>Perplexity when the KV cache is cut to a budget of tokens per head, by policy: <b>Q-Filters</b> "
             "(these filters), <b>K-norm</b> (keep keys with the smallest norm), <b>StreamingLLM</b> (keep the first "
             "and the most recent tokens) and the full cache. Gap = perplexity minus full-cache perplexity (lower "
             "is better). Gap ratio = Q-Filters' gap / StreamingLLM's gap: below 1 means Q-Filters beat the free "
             f"baseline. The gates are read at the reference budget ({ref}, highlighted).</p>"]
    for i, ppl in enumerate(report.perplexity):
        d = ppl.dataset
        parts.append(f'<div id="ppl-{i}" class="ppl-block"><h3>{i + 1}. <code>{_e(d.spec)}</code></h3>')
        parts.append(f'<p class="small muted">{_e(count(d.documents))} documents, {_e(count(d.tokens))} tokens '
                     f"scored (last {ppl.score_last} of {ppl.seq_len}-token sequences)"
                     + (f", {ppl.documents_skipped} document{'s' if ppl.documents_skipped != 1 else ''} skipped"
                        if ppl.documents_skipped else "")
                     + f"; source {_e(d.source)}; sha256 <code>{_e(d.sha256[:16])}</code>.</p>")
        parts.append(_img(figures.perplexity_plot(ppl, ref), f"ppl-vs-budget-{i}",
                          f"Perplexity versus KV budget on {d.spec} for every policy",
                          f"Perplexity on <code>{_e(d.spec)}</code> per KV budget (log scale); dashed line: full "
                          f"cache ({num(ppl.full_perplexity, 2)})."))
        budgets = sorted({int(r.budget) for r in ppl.rows if r.budget is not None})
        windows = {int(r.budget): r.window for r in ppl.rows if r.budget is not None and r.window is not None}
        headers = ["Policy"] + [f"budget {b}" + (" (ref.)" if b == ref else "")
                                + (f'<br><span class="small muted">window {windows[b]}</span>' if b in windows else "")
                                for b in budgets]
        rows = []
        for policy in policy_order(r.policy for r in ppl.rows):
            name = _e(policy_label(policy))
            if policy == "full":
                rows.append([name] + [_e(num(ppl.full_perplexity, 2))] * len(budgets))
                continue
            cells = []
            for b in budgets:
                p, g = ppl_cell(ppl, policy, b)
                cells.append("\u2014" if p is None else f"{_e(num(p, 2))} <span class=\"muted\">"
                                                         f"({_e(num(g, 2, signed=True))})</span>")
            rows.append([name] + cells)
        ratio_cells = []
        for b in budgets:
            r = ppl.gap_ratio_vs_streamingllm.get(str(b))
            cls = "good" if _finite(r) and r < 1 else ("bad" if _finite(r) else "muted")
            ratio_cells.append(f'<span class="{cls}">{_e(num(r, 3))}</span>' if r is not None
                               else '<span class="muted" title="StreamingLLM loses nothing here">undefined</span>')
        rows.append(["Gap ratio Q-Filters / StreamingLLM"] + ratio_cells)
        classes = [""] * (len(rows) - 1) + ["ratio-row"]
        highlight = {budgets.index(ref) + 1: "ref"} if ref in budgets else {}
        parts.append(_table(headers, rows, table_id=f"ppl-table-{i}", numeric=range(1, len(budgets) + 1),
                            row_classes=classes, column_class=highlight))
        parts.append('<p class="small muted">Cells: perplexity (gap vs full cache).</p></div>')
    if not report.perplexity:
        parts.append('<p class="muted">No evaluation dataset in this report.</p>')
    parts.append("</section>")
    return "".join(parts)


def _transfer(report: ValidationReport) -> str:
    t = report.transfer
    parts = ['<section id="transfer"><h2>Transfer between datasets</h2>',
             f"<p>Filters calibrated on one dataset (rows; the last row is the combined filters that are published) "
             f"evaluated on another (columns), at budget {t.budget} with a window of {t.window}. Each cell: gap ratio "
             "vs StreamingLLM (below 1: Q-Filters better) and perplexity. Filters that work only on their own "
             "calibration text show up as a bad row.</p>"]
    headers = ["Calibrated on \u2193 / evaluated on \u2192"] + [f"<code>{_e(c)}</code>" for c in t.evaluation]
    rows = []
    for i, label in enumerate(t.calibration):
        cells = []
        for j in range(len(t.evaluation)):
            r = t.gap_ratio_vs_streamingllm[i][j] if j < len(t.gap_ratio_vs_streamingllm[i]) else None
            p = t.perplexity[i][j] if j < len(t.perplexity[i]) else None
            cls = "good" if _finite(r) and r < 1 else ("bad" if _finite(r) else "muted")
            ratio = _e(num(r, 3)) if r is not None else "undefined"
            cells.append(f'<span class="{cls}">{ratio}</span> <span class="muted">ppl {_e(num(p, 2))}</span>')
        rows.append([f"<code>{_e(label)}</code>"] + cells)
    classes = [""] * (len(rows) - 1) + ["ratio-row"] if rows else []
    parts.append(_table(headers, rows, table_id="transfer-table", numeric=range(1, len(t.evaluation) + 1),
                        row_classes=classes))
    parts.append(_img(figures.transfer_heatmap(t), "transfer-matrix",
                      "Heatmap of the gap ratio versus StreamingLLM for filters calibrated on each dataset and "
                      "evaluated on each evaluation dataset",
                      "Green: Q-Filters lose less perplexity than StreamingLLM (ratio below 1); red: more. The row "
                      "below the white line is the combined filters."))
    parts.append("</section>")
    return "".join(parts)


def _yes_no(flag: bool, risky: bool) -> str:
    text = "yes" if flag else "no"
    return f'<span class="risk-yes">{text}</span>' if risky else text


def _architecture(report: ValidationReport) -> str:
    a = report.architecture
    window = f"{a.sliding_window} tokens" if a.sliding_window else "none"
    rows = [
        ["Model type", f"<code>{_e(a.model_type)}</code>", ""],
        ["Layers / query heads / KV heads / head dim",
         _e(f"{a.num_layers} / {a.num_attention_heads} / {a.num_kv_heads} / {a.head_dim}"), ""],
        ["QK-norm", _yes_no(a.qk_norm, a.qk_norm),
         "Queries and keys are normalized per head; the paper reports Q-Filters fail on such models."],
        ["Bias on Q/K/V projections", _yes_no(a.qkv_bias, a.qkv_bias),
         "The paper reports weaker results on models with a QKV bias."],
        ["Rotary position embeddings (RoPE)", _yes_no(a.rope, not a.rope),
         "Q-Filters were derived and tested on RoPE models."],
        ["Sliding window", _e(window), "Sliding-window layers keep a bounded cache and are not compressed."],
        ["Sliding-window layers", _e(layer_ranges(a.sliding_layers)), ""],
        ["Compressed layers", _e(f"{layer_ranges(a.compressed_layers)} ({len(a.compressed_layers)} of "
                                 f"{a.num_layers})"), "Full-attention layers, whose cache Q-Filters evict."],
        ["Anisotropy \u03c3\u2081/\u03c3\u2082 (median / lowest)",
         _e(f"{num(a.sigma_ratio_median, 2)} / {num(a.sigma_ratio_min, 2)}"),
         "How much the queries of a head favour one direction (1 = none); Q-Filters rely on it."],
        ["Queries on the filter's side (median share)",
         _e(num(100 * a.positive_share_median, 1) + "%" if a.positive_share_median is not None else "\u2014"),
         "Share of queries pointing along the filter direction; Q-Filters assume most do."],
    ]
    parts = ['<section id="architecture"><h2>Architecture and risks</h2>',
             "<p>Facts of the model that the Q-Filters paper ties to success or failure, and the anisotropy "
             "measured during calibration. They never decide the verdict: the gates above do.</p>"]
    if a.warnings:
        parts.append('<div id="architecture-warnings" class="warnings" role="note"><h3>Risks for this model</h3><ul>'
                     + "".join(f"<li>{_e(w)}</li>" for w in a.warnings) + "</ul></div>")
    else:
        parts.append('<p id="architecture-warnings" class="good">No architecture risk found.</p>')
    parts.append(_table(["Fact", "This model", "Why it matters"], rows, table_id="architecture-table"))
    parts.append("</section>")
    return "".join(parts)


def _datasets(report: ValidationReport) -> str:
    rows = []
    for role, items in (("calibration", report.calibration_datasets),
                        ("evaluation", [p.dataset for p in report.perplexity])):
        for d in items:
            rows.append([f"<code>{_e(d.spec)}</code>", _e(role), _e(d.source), _e(count(d.documents)),
                         _e(count(d.tokens)), f'<code title="{_e(d.sha256)}">{_e(d.sha256[:16])}</code>'])
    return ('<section id="datasets"><h2>Datasets</h2>'
            + _table(["Spec", "Role", "Source", "Documents", "Tokens", "Content sha256"], rows,
                     table_id="datasets-table", numeric=(3, 4))
            + "</section>")


def _section(s: Section | None, figure: str = "") -> str:
    if s is None:
        return ""
    table = _table([_e(h) for h in s.headers], [[_e(c) for c in row] for row in s.rows],
                   table_id=f"{s.element_id}-table", numeric=s.numeric)
    findings = "".join(f'<p class="finding">{_e(f)}</p>' for f in s.findings)
    return (f'<section id="{s.element_id}"><h2>{_e(s.title)}</h2><p>{_e(s.intro)}</p>{figure}{table}{findings}'
            "</section>")


def _passkey_figure(report: ValidationReport) -> str:
    if report.passkey is None:
        return ""
    pk = report.passkey
    return _img(figures.passkey_plot(pk), "passkey-vs-budget", "Passkey accuracy versus KV budget for every policy",
                f"Keys retrieved out of {pk.trials} per KV budget (log scale); dashed line: full cache.")


def render_html(report: ValidationReport) -> str:
    """The whole report as one self-contained HTML page (inline CSS, PNG data URIs, no script, no network)."""
    status = "PASS" if report.verdict.status == "pass" else "FAIL"
    title = f"{status}: Q-Filters validation of {report.model_id}"
    body = "".join([
        f"<header><h1>Q-Filters validation: <code>{_e(report.model_id)}</code></h1>",
        f'<p class="subtitle">Can the Q-Filters calibrated for this model be published? Generated by qfilters '
        f"{_e(report.qfilters_version)} on {_e(report.created_at)}.</p></header>",
        _verdict(report),
        _summary(report),
        _stability(report),
        _sampling(report),
        _perplexity(report),
        _section(recipe_section(report)),
        _section(passkey_section(report), _passkey_figure(report)),
        _transfer(report),
        _architecture(report),
        _datasets(report),
        f'<footer>Q-Filters: arXiv 2503.02812. Report schema {_e(report.schema_version)}; the same data is in '
        "report.json next to this page.</footer>",
    ])
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")
