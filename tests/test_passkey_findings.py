"""What the report and the model card say about passkey retrieval: numbers stated, negatives never hidden."""

from __future__ import annotations

import pytest

from qfilters.validation.markdown import render_markdown
from qfilters.validation.passkey_check import passkey_findings, passkey_warnings
from qfilters.validation.render import render_html
from qfilters.validation.schema import PasskeyCell, PasskeyReport
from tests.report_fixtures import make_report


def _report(cells: dict[str, list[int]], full: int = 48, trials: int = 48, context: int = 1024) -> PasskeyReport:
    budgets = (128, 256, 512)
    rows = [PasskeyCell(policy="full", budget=None, correct=full, accuracy=full / trials)]
    rows += [PasskeyCell(policy=name, budget=b, correct=c, accuracy=c / trials)
             for name, per_budget in cells.items() for b, c in zip(budgets, per_budget, strict=True)]
    return PasskeyReport(filler="austen", trials=trials, context_tokens=context, seed=0, rows=rows)


# measured on SmolLM2-135M-Instruct, 48 needles at ~1k tokens (research/issue13/passkey-1024-*.json)
MEASURED = {"streamingllm": [7, 14, 25], "knorm": [3, 3, 3], "qfilters": [3, 3, 4], "recipe": [3, 7, 7],
            "snapkv": [2, 3, 6]}


def test_a_negative_result_is_stated_with_its_numbers() -> None:
    findings, warnings = passkey_findings(_report(MEASURED), "recipe")
    assert findings[0].startswith("The shipped policy (Searched recipe) retrieves 3/48 at budget 128 (6% of the full "
                                  "cache's 48/48; StreamingLLM 7/48)")
    assert "7/48 at budget 256 (15% of the full cache's 48/48; StreamingLLM 14/48)" in findings[0]
    assert any("does not beat StreamingLLM at budget(s) 128, 256, 512" in w for w in warnings)
    assert any("at budget 256 (4x compression) the shipped policy (Searched recipe) keeps 7 of the full cache's 48 "
               "keys (15%), less than half" in w for w in warnings)
    # the best FlashAttention-compatible policy is named; the SnapKV reference (attention weights) never is
    assert any("No FlashAttention-compatible policy keeps half" in f and "StreamingLLM with 14/48 (29% of full)" in f
               for f in findings)
    assert set(warnings) <= set(findings)


def test_a_policy_that_retrieves_gets_no_warning() -> None:
    good = {**MEASURED, "recipe": [20, 40, 47]}
    findings, warnings = passkey_findings(_report(good), "recipe")
    assert warnings == [] and not any("No FlashAttention-compatible" in f for f in findings)
    # ties with StreamingLLM are not a win
    tied = {**MEASURED, "recipe": [7, 40, 47]}
    assert passkey_warnings(_report(tied), "recipe") == [
        "Passkey retrieval: the shipped policy (Searched recipe) does not beat StreamingLLM at budget(s) 128 "
        "(1024-token contexts)."]


def test_shipped_stock_filters_and_missing_cells() -> None:
    no_recipe = {k: v for k, v in MEASURED.items() if k != "recipe"}
    findings, warnings = passkey_findings(_report(no_recipe), "qfilters")
    assert findings[0].startswith("The shipped policy (Q-Filters) retrieves 3/48 at budget 128")
    assert passkey_findings(_report(no_recipe), "recipe") == ([], [])  # nothing to say about a policy not measured
    assert passkey_warnings(None, "recipe") == []
    # a context whose 4x budget was not measured says nothing about 4x
    assert not any("4x" in w for w in passkey_findings(_report(no_recipe, context=1536), "qfilters")[1])


@pytest.fixture(scope="module")
def report_with_passkey():
    report = make_report(True)
    return report.model_copy(update={"passkey": _report({k: v for k, v in MEASURED.items() if k != "recipe"})})


def test_both_pages_state_the_finding_and_show_the_figure(report_with_passkey) -> None:
    md = render_markdown(report_with_passkey)
    assert "### Retrieval under compression (passkey)" in md
    assert "No FlashAttention-compatible policy keeps half of the full cache's retrieval at budget 256" in md
    page = render_html(report_with_passkey)
    assert 'id="passkey-vs-budget"' in page and 'class="finding"' in page
    assert "less than half" in page


def test_the_hub_card_carries_the_passkey_figure(report_with_passkey) -> None:
    from qfilters.hub import _figures
    from qfilters.modelcard import PASSKEY_FIGURE

    figures = _figures(report_with_passkey)
    paths = [path for path, _, _ in figures]
    assert paths[-1] == PASSKEY_FIGURE and all(p.startswith("report/perplexity-") for p in paths[:-1])
    assert figures[-1][2].startswith(b"\x89PNG")
    assert PASSKEY_FIGURE not in [p for p, _, _ in _figures(make_report(True))]


def test_a_deployable_policy_that_retrieves_better_than_the_shipped_one_is_named() -> None:
    """Measured shape (research/issue13): novelty keeps over half at 4x where Q-Filters keep almost nothing."""
    cells = {**{k: v for k, v in MEASURED.items() if k != "recipe"}, "novelty": [8, 26, 42]}
    findings, warnings = passkey_findings(_report(cells), "qfilters")
    assert ("Novelty (running key mean) keeps 26/48 (54% of full) at budget 256 (4x compression), against 3/48 for "
            "the shipped policy") in " ".join(findings)
    assert not any("No FlashAttention-compatible" in f for f in findings)
    assert any("less than half" in w for w in warnings)  # the shipped policy's own shortfall is still a warning
    # when the shipped policy is the best, nothing is recommended instead
    assert not any("use it" in f for f in passkey_findings(_report({**cells, "recipe": [9, 30, 44]}), "recipe")[0])
