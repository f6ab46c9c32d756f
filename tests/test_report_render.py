"""The validation report's renderers: HTML checked in a real headless Chromium, Markdown, files, loading.

Browser tests drive Debian's /usr/bin/chromium through playwright (never a downloaded browser) and are skipped only
when that binary is absent. Screenshots go to the ``artifacts_dir`` (test-artifacts/report_pass.png, report_fail.png).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from report_fixtures import make_report

from qfilters.errors import ArtifactError
from qfilters.validation import figures
from qfilters.validation.render import load_report, render_html, render_markdown, report_json, write_report_files

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="/usr/bin/chromium is not installed (scripts/setup.sh installs it)")

XSS_SPEC = "<script>window.__xss=1</script>"
XSS_EVAL = '"><img src=x onerror="window.__xss=2">|`*_'
XSS_MODEL = "evil/<b>model</b>"

# elements a reader must see; images among them must be decoded
KEY_ELEMENTS = ["verdict", "gates", "cosine-matrix", "head-heatmap", "layer-curves", "ppl-vs-budget-0",
                "ppl-vs-budget-1", "ppl-table-0", "transfer-matrix", "transfer-table", "architecture-table",
                "sampling-table"]
KEY_IMAGES = ["cosine-matrix", "head-heatmap", "layer-curves", "sampling-curves", "ppl-vs-budget-0",
              "ppl-vs-budget-1", "transfer-matrix"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reports():
    return {"pass": make_report(True), "fail": make_report(False)}


@pytest.fixture(scope="module")
def pages(reports):
    return {name: render_html(r) for name, r in reports.items()}


@pytest.fixture(scope="module")
def xss_report():
    report = make_report(True, calibration=["handbook:en", XSS_SPEC, "austen"], evaluation=["austen", XSS_EVAL])
    return report.model_copy(update={"model_id": XSS_MODEL})


@pytest.fixture(scope="module")
def xss_html(xss_report):
    return render_html(xss_report)


def _open(browser, html: str, directory: Path, *, strip_csp: bool = False):
    """Load ``html`` from a file:// URL; every request is logged and anything but the document or data: aborted."""
    if strip_csp:  # prove the page itself asks for nothing, not just that its CSP forbids it
        html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    path = directory / "report.html"
    path.write_text(html, encoding="utf-8")
    url = path.as_uri()
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))

    def route(r):
        if r.request.url == url or r.request.url.startswith("data:"):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load")
    return page, url, requests


# --------------------------------------------------------------------------------------------------- browser
@needs_chromium
@pytest.mark.parametrize("status", ["pass", "fail"])
def test_report_page_in_chromium(status, reports, pages, browser, artifacts_dir, tmp_path):
    """Acceptance: verdict, heatmaps, perplexity plots and transfer matrix are present, visible and decoded."""
    report = reports[status]
    page, _, _ = _open(browser, pages[status], tmp_path)
    try:
        width = page.evaluate("document.documentElement.scrollWidth")
        height = page.evaluate("document.documentElement.scrollHeight")
        for element_id in KEY_ELEMENTS:
            loc = page.locator(f"#{element_id}")
            assert loc.count() == 1, f"#{element_id} missing"
            assert loc.is_visible(), f"#{element_id} not visible"
            box = loc.bounding_box()
            assert box and box["width"] > 50 and box["height"] > 20, f"#{element_id} has no size: {box}"
            assert box["x"] >= 0 and box["y"] >= 0, f"#{element_id} outside the page: {box}"
            assert box["x"] + box["width"] <= width + 1 and box["y"] + box["height"] <= height + 1, \
                f"#{element_id} sticks out of the page: {box}"
        for figure_id in KEY_IMAGES:
            img = page.locator(f"#{figure_id} img")
            assert img.is_visible(), f"#{figure_id} image not visible"
            decoded = img.evaluate("i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0")
            assert decoded, f"#{figure_id} image did not decode"
            assert img.get_attribute("alt"), f"#{figure_id} image has no alt text"
            assert page.locator(f"#{figure_id} figcaption").inner_text().strip()
            box = img.bounding_box()
            assert box["x"] + box["width"] <= width + 1, f"#{figure_id} image wider than the page"

        expected = "PASS" if report.verdict.status == "pass" else "FAIL"
        assert page.inner_text("#verdict-status").strip() == expected
        assert page.get_attribute("#verdict", "data-status") == report.verdict.status
        assert page.title().startswith(expected)
        r, g, _ = map(int, re.findall(r"\d+", page.eval_on_selector(
            "#verdict", "e => getComputedStyle(e).backgroundColor"))[:3])
        assert (g > r) if expected == "PASS" else (r > g), "verdict box colour does not match the verdict"
        gate_rows = page.locator("#gates tbody tr")
        assert gate_rows.count() == len(report.verdict.gates)
        for i, gate in enumerate(report.verdict.gates):
            assert ("PASS" if gate.passed else "FAIL") in gate_rows.nth(i).inner_text()
        if report.verdict.reasons:
            assert page.locator("#verdict-reasons li").count() == len(report.verdict.reasons)
        if report.verdict.warnings:
            assert page.locator("#verdict-warnings").is_visible()
            assert page.locator("#verdict-warnings li").count() == len(report.verdict.warnings)
        else:
            assert page.locator("#verdict-warnings").count() == 0
        k = len(report.transfer.calibration)
        assert page.locator("#transfer-table tbody tr").count() == k
        page.screenshot(path=str(artifacts_dir / f"report_{status}.png"), full_page=True)
    finally:
        page.close()


@needs_chromium
def test_report_page_makes_no_network_request(pages, browser, tmp_path):
    page, url, requests = _open(browser, pages["fail"], tmp_path, strip_csp=True)
    try:
        page.wait_for_load_state("networkidle")
        others = [u for u in requests if u != url and not u.startswith("data:")]
        assert requests and requests[0] == url
        assert others == [], f"the page requested {others}"
        resources = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        assert [u for u in resources if not u.startswith("data:")] == []
    finally:
        page.close()


@needs_chromium
def test_user_text_is_shown_as_text_in_chromium(xss_html, browser, tmp_path):
    page, _, _ = _open(browser, xss_html, tmp_path, strip_csp=True)
    try:
        assert page.evaluate("window.__xss") is None, "text from the report ran as code"
        text = page.inner_text("body")
        assert XSS_SPEC in text
        assert XSS_EVAL in text
        assert XSS_MODEL in text
        assert page.locator("body script").count() == 0
    finally:
        page.close()


# ------------------------------------------------------------------------------------------------- static HTML
def test_html_is_self_contained(pages):
    for html in pages.values():
        assert html.startswith("<!DOCTYPE html>")
        assert "<script" not in html.lower()
        targets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html, flags=re.I)
        targets += re.findall(r"url\(([^)]*)\)", html, flags=re.I)
        assert targets, "no images found"
        assert all(t.startswith("data:image/png;base64,") for t in targets), targets
        assert "@import" not in html and "http://" not in html and "https://" not in html


def test_user_text_is_escaped(xss_report, xss_html):
    html = xss_html
    assert XSS_SPEC not in html and "<img src=x" not in html and "<b>model</b>" not in html
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    assert "evil/&lt;b&gt;model&lt;/b&gt;" in html

    md = render_markdown(xss_report)
    prose = re.sub(r"^(`{3,}).*?^\1", "", md, flags=re.S | re.M)  # drop fenced code
    prose = re.sub(r"`[^`\n]*`", "", prose)  # drop inline code spans
    for needle in ("<script", "<img", "<b>"):
        assert needle not in prose, f"{needle!r} reaches the Markdown unescaped"
    lines = md.splitlines()
    header = next(row for row in lines if row.startswith("| Evaluation dataset"))
    row = next(row for row in lines if row.startswith("| `\"><img"))  # '|' in the spec must not add a column
    cells = re.compile(r"(?<!\\)\|")
    assert len(cells.findall(row)) == len(cells.findall(header))


# ---------------------------------------------------------------------------------------------- determinism
def test_rendering_is_deterministic(reports, pages, tmp_path):
    """Same report, same bytes: html (figures included), md and json, whatever the caller's matplotlib settings."""
    import matplotlib

    report = reports["fail"]
    with matplotlib.rc_context({"font.size": 20, "axes.facecolor": "red", "figure.dpi": 33, "svg.hashsalt": None}):
        paths = write_report_files(report, tmp_path / "a")
    assert set(paths) == {"json", "html", "md"}
    assert paths["html"].read_text(encoding="utf-8") == pages["fail"]
    assert paths["md"].read_text(encoding="utf-8") == render_markdown(report) == render_markdown(report)
    assert paths["json"].read_text(encoding="utf-8") == report.model_dump_json(indent=2) + "\n" == report_json(report)
    assert paths["json"].read_bytes() == report_json(load_report(paths["json"])).encode()


def test_rendering_is_identical_in_another_process(pages, tmp_path):
    """Hash seeds and matplotlib state of a fresh interpreter change nothing."""
    script = (
        "import hashlib, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from report_fixtures import make_report\n"
        "from qfilters.validation.render import render_html, render_markdown\n"
        "r = make_report(False)\n"
        "print(hashlib.sha256(render_html(r).encode()).hexdigest(), "
        "hashlib.sha256(render_markdown(r).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    assert out[0] == hashlib.sha256(pages["fail"].encode()).hexdigest()
    assert out[1] == hashlib.sha256(render_markdown(make_report(False)).encode()).hexdigest()


# -------------------------------------------------------------------------------------------------- content
def test_html_content(reports, pages):
    report, html = reports["fail"], pages["fail"]
    for reason in report.verdict.reasons:
        assert reason.replace("'", "&#x27;") in html
    for warning in report.architecture.warnings:
        assert warning.replace("'", "&#x27;") in html
    assert 'id="ppl-vs-budget-0"' in html and 'id="ppl-vs-budget-1"' in html
    assert "Heads below 0.9" in html and "layer 17 head 2" in html
    assert "not reached" in html  # the noisy calibration dataset never stabilised
    assert 'class="num ref"' in html  # the reference budget column is highlighted
    assert html.count("Gap ratio Q-Filters / StreamingLLM") == len(report.perplexity)
    assert "every (layer, kv head) stays" in pages["pass"].lower()


def test_markdown_model_card_section(reports):
    for status, report in reports.items():
        md = render_markdown(report)
        assert md.startswith("## Q-Filters validation\n")
        verdict = "\u2705 PASS" if status == "pass" else "\u274c FAIL"
        assert f"Verdict: {verdict}" in md
        for gate in report.verdict.gates:
            assert f"`{gate.name}`" in md
        for p in report.perplexity:
            assert re.search(rf"^\| `{re.escape(p.dataset.spec)}` \| {p.full_perplexity:.2f} \|", md, flags=re.M)
        assert f"KV budget of {report.settings.reference_budget} tokens" in md
        assert "QFilters.from_pretrained(" in md and "QFilterPress" in md
        assert md.count("```") % 2 == 0
    fail_md = render_markdown(reports["fail"])
    assert "QK-norm" in fail_md and "not reached" in fail_md
    assert "'me/my-filters'" in render_markdown(reports["pass"], repo_id="me/my-filters")


def test_reports_with_missing_numbers_and_a_large_model_render():
    big = make_report(True, num_layers=64, num_kv_heads=8, calibration=[f"data-{i}" for i in range(9)])
    data = json.loads(report_json(big))
    data["perplexity"][0]["gap_ratio_vs_streamingllm"]["64"] = None
    data["transfer"]["gap_ratio_vs_streamingllm"][0][0] = None
    data["verdict"]["gates"][1]["value"] = None
    data["sampling"][0]["checkpoints"] = []
    data["architecture"]["sigma_ratio_median"] = None
    report = type(big).model_validate(data)
    html = render_html(report)
    assert "undefined" in html and html.count("<img") == 7
    md = render_markdown(report)
    assert "\u2014" in md  # the unmeasured gate value


def test_cosine_ticks_do_not_collide():
    for low in (-1.0, 0.0, 0.35, 0.8, 0.9):
        ticks = figures._cosine_ticks(low)
        coords = [float(figures.nines(t)) for t in ticks]
        span = coords[-1] - coords[0]
        assert 0.9 in ticks and 0.999 in ticks
        assert all(b - a >= figures.TICK_GAP * span - 1e-9 for a, b in itertools.pairwise(coords))


# ------------------------------------------------------------------------------------------------ files, load
def test_write_is_atomic_and_load_round_trips(reports, tmp_path, monkeypatch):
    report = reports["pass"]
    paths = write_report_files(report, tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {"json": "report.json", "html": "report.html", "md": "report.md"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json", "report.md"]
    assert load_report(tmp_path / "out") == report
    assert load_report(paths["json"]) == report

    # a renderer failing leaves the previous files untouched and no temporary file behind
    import qfilters.validation.render as render

    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(render, "render_html", lambda r: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        write_report_files(reports["fail"], tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_load_report_errors(reports, tmp_path):
    def fails(path: Path, *needles: str) -> None:
        with pytest.raises(ArtifactError) as info:
            load_report(path)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert str(path) in message
        for needle in needles:
            assert needle in message, message

    fails(tmp_path / "nowhere" / "report.json", "not found", "qfilters validate")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "not found")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": "1", ', encoding="utf-8")
    fails(bad, "not valid JSON", "line 1")
    bad.write_text("[1, 2]", encoding="utf-8")
    fails(bad, "JSON object")
    data = json.loads(report_json(reports["pass"]))
    bad.write_text(json.dumps({**data, "schema_version": "2"}), encoding="utf-8")
    fails(bad, "schema_version '2'", "reads version '1'")
    bad.write_text(json.dumps({k: v for k, v in data.items() if k != "schema_version"}), encoding="utf-8")
    fails(bad, "no schema_version")
    bad.write_text(json.dumps({k: v for k, v in data.items() if k != "verdict"}), encoding="utf-8")
    fails(bad, "does not match", "verdict")
    bad.write_bytes(b"\xff\xfe\x00garbage")
    fails(bad, "cannot read")
