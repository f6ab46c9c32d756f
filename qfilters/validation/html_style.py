"""The report page's stylesheet (inline in the page: the report is one self-contained file)."""

CSS = """
:root { --pass: #17803d; --pass-bg: #e9f7ee; --fail: #c62828; --fail-bg: #fdecec; --warn: #8a5a00;
  --warn-bg: #fff6dc; --warn-border: #f0b400; --line: #d9dde3; --muted: #5b6370; --ink: #1c2128; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1060px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 1.55rem; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 1.22rem; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05rem; margin: 22px 0 8px; overflow-wrap: anywhere; }
p { margin: 6px 0 10px; }
.subtitle { color: var(--muted); margin: 0 0 18px; overflow-wrap: anywhere; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.88em; overflow-wrap: anywhere; }
.verdict { border: 2px solid; border-radius: 8px; padding: 14px 18px 16px; margin: 8px 0 20px; }
.verdict-pass { border-color: var(--pass); background: var(--pass-bg); }
.verdict-fail { border-color: var(--fail); background: var(--fail-bg); }
.verdict-head { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
.verdict-status { font-size: 2rem; font-weight: 800; letter-spacing: 0.06em; margin: 0; }
.verdict-pass .verdict-status { color: var(--pass); }
.verdict-fail .verdict-status { color: var(--fail); }
.verdict-line { font-size: 1.02rem; margin: 0; }
.reasons { margin: 8px 0 4px; padding-left: 22px; }
.reasons li { margin: 3px 0; overflow-wrap: anywhere; }
.warnings { background: var(--warn-bg); border: 1px solid var(--warn-border); border-left: 6px solid var(--warn-border);
  border-radius: 6px; padding: 10px 14px; margin: 12px 0; color: #3d2a00; }
.warnings h3 { margin: 0 0 4px; font-size: 0.98rem; color: var(--warn); }
.finding { border-left: 4px solid var(--warn-border); padding-left: 10px; }
.warnings ul { margin: 0; padding-left: 20px; }
.warnings li { margin: 3px 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 0.9rem; background: #fff; }
th, td { border: 1px solid var(--line); padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
#gates th[scope=row] { white-space: nowrap; }
#architecture-table td:nth-child(2) { min-width: 9em; }
.wide { width: 100%; }
.table-scroll { overflow-x: auto; }
.badge { display: inline-block; min-width: 3.4em; text-align: center; font-weight: 700; font-size: 0.8rem;
  border-radius: 4px; padding: 1px 6px; color: #fff; }
.badge-pass { background: var(--pass); }
.badge-fail { background: var(--fail); }
tr.gate-fail td { background: #fff5f5; }
.ref { background: #fff9e6; }
.ratio-row td, .ratio-row th { border-top: 2px solid #9aa3ad; }
.good { color: var(--pass); font-weight: 600; }
.bad { color: var(--fail); font-weight: 600; }
.muted { color: var(--muted); }
.small { font-size: 0.85rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 8px 0 14px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 0 32px; }
@media (max-width: 820px) { .columns { grid-template-columns: 1fr; } }
figure { margin: 14px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.86rem; margin-top: 6px; max-width: 920px; }
.summary-line { font-size: 1rem; }
.pill { display: inline-block; padding: 0 7px; border-radius: 10px; background: #eef1f4; font-size: 0.85rem; }
.risk-yes { color: var(--warn); font-weight: 700; }
footer { margin-top: 40px; color: var(--muted); font-size: 0.82rem; border-top: 1px solid var(--line);
  padding-top: 10px; }
"""
