"""validate --search-recipe: a recipe chosen on calibration text only, checked on held-out text."""

from __future__ import annotations

import html
import json
import re
from dataclasses import replace

import pytest
import torch

from qfilters.artifact import QFilters
from qfilters.cache import QFiltersCache
from qfilters.data.chunks import select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import Recipe, RecipeBook
from qfilters.validation.markdown import render_markdown
from qfilters.validation.output import report_json
from qfilters.validation.recipe_search import search_recipes, stock_recipe
from qfilters.validation.render import render_html
from qfilters.validation.run import run_validation
from tests.test_validation import TINY, _corpus, one_thread

SEARCH = replace(TINY, search_recipe=True, recipe_docs=1)
CALIB, EVAL = (0, 1, 2), (3, 4)


def _run(tiny_llama, settings=SEARCH, evaluation=None):
    events = []
    evaluation = [_corpus(i) for i in EVAL] if evaluation is None else evaluation
    run = run_validation(tiny_llama, [_corpus(i) for i in CALIB], evaluation, settings,
                         on_progress=events.append, created_at="2000-01-01T00:00:00Z")
    return run, events


@pytest.fixture(scope="module")
def searched(tiny_llama):
    return one_thread(_run, tiny_llama)


def test_search_reads_calibration_text_only_and_reports_each_budget(searched) -> None:
    run, events = searched
    r = run.report
    assert r.settings.search_recipe and r.recipe is not None
    assert [c.budget for c in r.recipe.chosen] == [24, 48]
    # one document of each calibration dataset; no evaluation dataset is ever read by the search
    assert [d.split(":")[1] for d in r.recipe.documents] == [str(i) for i in CALIB]
    assert all(c.recipe["scorer"] in ("qfilters", "knorm") for c in r.recipe.chosen)
    assert "recipe" in {e.phase for e in events}
    for c in r.recipe.chosen:
        chosen = Recipe.from_dict(c.recipe)
        assert c.description.startswith(chosen.describe())
        if chosen.allocation == "head":  # a per-head split says how far apart its heads' budgets are
            assert re.search(r"KV heads keep \d+ to \d+ keys, median \d+\)$", c.description)
        else:
            assert c.description == chosen.describe()
        # the reported score is the engine's, on exactly the search text (one document per calibration dataset)
        assert c.search_perplexity == round(_on_search_text(run, chosen, c.budget), 6)


_TINY_MODEL = {}


def _on_search_text(run, recipe: Recipe, budget: int) -> float:
    """Perplexity of ``recipe`` on the text the search used: the first document of each calibration dataset."""
    lm = _TINY_MODEL["lm"]
    parts = [select_chunks(lm.tokenizer, _corpus(i), SEARCH.eval_seq_len, 1) for i in CALIB]
    chunks = parts[0]
    chunks.ids = [x for c in parts for x in c.ids]
    chunks.titles = [t for c in parts for t in c.titles]
    stored = run.filters.recipe  # its sensitivities and score spreads, when the recipe reads them
    policy = replace(stored, by_budget={budget: recipe}).policy(
        budget, lm.model, ScorerInputs(filters=run.filters), SEARCH.eval_seq_len)
    return evaluate_chunks(lm.model, chunks, {("r", budget): policy}, score_last=SEARCH.score_last
                           ).perplexity("r", budget)


@pytest.fixture(autouse=True)
def _model(tiny_llama):
    _TINY_MODEL["lm"] = tiny_llama


def test_held_out_rows_are_the_stored_recipe_measured_by_the_engine(searched, tiny_llama) -> None:
    run, _ = searched
    book = run.filters.recipe
    assert book is not None and book.to_dict()["by_budget"] == {
        str(c.budget): c.recipe for c in run.report.recipe.chosen}
    rows = {(x.policy, x.budget): x for x in run.report.perplexity[0].rows}
    assert rows["recipe", 24].window is None and ("recipe", 48) in rows
    chunks = select_chunks(tiny_llama.tokenizer, _corpus(EVAL[0]), SEARCH.eval_seq_len, SEARCH.max_docs)
    direct = evaluate_chunks(tiny_llama.model, chunks,
                             {("recipe", 24): book.policy(24, tiny_llama.model, ScorerInputs(filters=run.filters),
                                                          SEARCH.eval_seq_len)}, score_last=SEARCH.score_last)
    assert rows["recipe", 24].perplexity == round(direct.perplexity("recipe", 24), 6)


def test_the_saved_filters_carry_the_recipe_and_the_cache_uses_it(searched, tiny_llama, tmp_path) -> None:
    run, _ = searched
    path = run.filters.save_pretrained(tmp_path / "filters")
    assert json.loads((path / "qfilters.json").read_text())["recipe"] == run.filters.recipe.to_dict()
    loaded = QFilters.from_pretrained(path)
    cache = QFiltersCache(tiny_llama.model, loaded, budget=24)
    expected = run.filters.recipe.policy(24, tiny_llama.model, ScorerInputs(filters=loaded))
    for layer, want in zip(cache.layers, expected.layers.values(), strict=True):
        assert (layer.policy.budget, layer.policy.window, layer.policy.n_sinks) == (want.budget, want.window,
                                                                                     want.n_sinks)
        assert type(layer.policy.scorer) is type(want.scorer)


def test_report_pages_show_the_recipe(searched) -> None:
    run, _ = searched
    text = render_markdown(run.report)
    assert "### Eviction recipe" in text and "QFiltersCache(model, filters, budget=24)" in text
    assert "never on evaluation text" in text
    page = render_html(run.report)
    assert 'id="recipe-table"' in page and html.escape(run.report.recipe.chosen[0].description) in page


def test_the_search_is_reproducible_byte_for_byte(searched, tiny_llama) -> None:
    run, _ = searched
    again, _ = _run(tiny_llama)
    assert report_json(again.report) == report_json(run.report)
    assert again.filters.recipe == run.filters.recipe


def test_without_the_flag_nothing_changes(tiny_llama) -> None:
    from tests.test_validation import _tiny_run

    plain, _ = _tiny_run(tiny_llama)
    assert plain.report.recipe is None and plain.filters.recipe is None
    assert all(x.policy != "recipe" for p in plain.report.perplexity for x in p.rows)


def test_the_model_card_shows_the_recipe(searched, tmp_path) -> None:
    from qfilters.modelcard import build_model_card

    run, _ = searched
    path = run.filters.save_pretrained(tmp_path / "filters")
    with_report = str(build_model_card(path, repo_id="org/tiny-qfilters", report=run.report, base_model="org/tiny"))
    assert "### Eviction recipe" in with_report and "QFiltersCache(model, filters, budget=24)" in with_report
    bare = str(build_model_card(path, repo_id="org/tiny-qfilters", base_model="org/tiny"))
    assert "eviction recipe" in bare and "QFiltersCache(model, filters, budget=512)" in bare
    assert "calibration text" in bare


def test_a_per_head_recipe_tells_users_to_load_the_model_with_sdpa(searched, tmp_path) -> None:
    """Its cache masks each head's padding, which flash-attn kernels cannot: the snippets say so, and only then."""
    from qfilters.modelcard import build_model_card

    run, _ = searched
    sdpa = "attn_implementation='sdpa'"
    by_head = any(c.recipe.get("allocation") == "head" for c in run.report.recipe.chosen)
    assert (sdpa in render_markdown(run.report)) == by_head
    chosen = [c.model_copy(update={"recipe": {**c.recipe, "allocation": "head"}}) for c in run.report.recipe.chosen]
    head_report = run.report.model_copy(update={"recipe": run.report.recipe.model_copy(update={"chosen": chosen})})
    uniform = [c.model_copy(update={"recipe": {**c.recipe, "allocation": "uniform"}}) for c in chosen]
    uniform_report = run.report.model_copy(update={"recipe": run.report.recipe.model_copy(update={"chosen": uniform})})
    assert sdpa in render_markdown(head_report) and sdpa not in render_markdown(uniform_report)
    one_head = head_report.model_copy(  # e.g. Gemma-3: one KV head per layer, so each layer's heads are equal
        update={"architecture": head_report.architecture.model_copy(update={"num_kv_heads": 1})})
    assert sdpa not in render_markdown(one_head)

    n_layers, n_heads = run.filters.filters.shape[:2]
    book = RecipeBook({24: Recipe("qfilters", 0.25, 4, "head")},
                      head_sensitivity=tuple((0.1,) * n_heads for _ in range(n_layers)))
    for recipe, shown in ((book, True), (RecipeBook({24: Recipe("qfilters", 0.25, 4)}), False)):
        path = run.filters.with_recipe(recipe).save_pretrained(tmp_path / f"filters-{shown}")
        assert (sdpa in str(build_model_card(path, repo_id="org/tiny-qfilters", base_model="org/tiny"))) == shown


def test_cli_search_recipe_writes_filters_with_the_recipe(tiny_llama, tmp_path) -> None:
    """Also with --filters: the searched recipe is saved with a copy of the given filters in OUT/filters."""
    from qfilters.validation.schema import ValidationReport
    from tests.test_validation import _cli

    model_dir = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    specs = []
    for seed in (0, 1, 3):
        d = tmp_path / f"corpus{seed}"
        d.mkdir()
        for i, doc in enumerate(_corpus(seed).documents):
            (d / f"doc{i}.txt").write_text(doc.text)
        specs.append(str(d))
    given = tmp_path / "given"
    QFilters(torch.randn(*tiny_llama.info.filter_shape, generator=torch.Generator().manual_seed(5))).save_pretrained(
        given)
    out = tmp_path / "out"
    res = _cli(["validate", str(model_dir), "-c", specs[0], "-c", specs[1], "-e", specs[2], "--out", str(out),
                "--tokens", "512", "--calib-seq-len", "128", "--eval-seq-len", "128", "--score-last", "64",
                "--budget", "48", "--budget", "24", "--max-docs", "2", "--filters", str(given), "--search-recipe",
                "--json"])
    assert res.exit_code in (0, 1), res.output
    report = ValidationReport.model_validate_json(res.stdout)
    saved = QFilters.from_pretrained(out / "filters")
    assert torch.equal(saved.filters, QFilters.from_pretrained(given).filters)
    assert saved.recipe is not None and sorted(saved.recipe.by_budget) == [c.budget for c in report.recipe.chosen]


def _cost(recipe: Recipe, case: str) -> float:
    """A made-up perplexity with a known coordinate-search path (``interaction``: a better stock; ``sensitivity``:
    the measured allocation wins; ``head``: the per-KV-head one does; ``blend``: novelty blended in wins;
    ``second_pass``: the blend wins only after the allocation has moved, so only a second pass over the axes finds it;
    ``recency``: an age discount wins; ``recall``: a recall head wins, elsewhere it costs a little; novelty read from
    the keys' content beats the cached keys' by a little)."""
    allocation = {"uniform": 0.0, "pyramid": -0.05, "sensitivity": -0.1 if case == "sensitivity" else -0.02,
                  "head": -0.12 if case == "head" else -0.01}
    value = ({"qfilters": 0.0, "knorm": 1.0}[recipe.scorer] + {0.125: 0.3, 0.25: 0.2, 0.5: 0.25}[recipe.window_share]
             + {0: 0.1, 4: 0.0}[recipe.n_sinks] + allocation[recipe.allocation] + 0.5 * recipe.full_layers
             + ({0.0: 0.0, 0.5: -0.3, 1.0: -0.1}[recipe.novelty_weight] if case == "blend" else 0.0)
             + ({0.0: 0.0, 0.125: -0.05, 0.25: -0.2, 0.5: -0.1}[recipe.recency_weight] if case == "recency" else 0.0)
             + (-0.01 if case in ("blend", "second_pass") and recipe.novelty_weight == 0.5
                and recipe.novelty_scorer == "content-novelty" else 0.0)
             + (0.0 if not recipe.recall_heads else -0.15 if case == "recall" else 0.05)
             + (0.01 * (recipe.recency_weight > 0) + 0.01 * (recipe.novelty_weight > 0)
                - 0.01 * (recipe.novelty_scorer == "content-novelty") if case == "recall" else 0.0))
    if case == "second_pass" and recipe.novelty_weight == 0.5:
        value += -0.2 if recipe.allocation == "pyramid" else 0.1  # wins only once a later axis has moved
    if case == "interaction" and (recipe.window_share, recipe.n_sinks, recipe.allocation) == (0.5, 0, "uniform"):
        value -= 1.0  # only reachable by changing two axes at once: the coordinate search misses it, stock has it
    return 10.0 + value


class _Scored:
    """What evaluate_chunks returns, reduced to one made-up perplexity."""

    def __init__(self, value: float) -> None:
        self.full_nll, self.value, self.full_perplexity = [0.0], value, 10.0

    def perplexity(self, name: str, budget: int) -> float:
        return self.value


#: a needle attention table for the tiny model (2 layers x 2 KV heads): what the fake search ranks recall heads by
NEEDLES = ((0.1, 0.7), (0.2, 0.3))


def _fake_evaluator(monkeypatch, case: str) -> None:
    """Every recipe scores _cost(recipe, case), StreamingLLM 99, the full pass 10; a book's policy is its recipe; the
    recall heads are ranked by NEEDLES."""
    import qfilters.evaluate
    import qfilters.validation.recipe_search as rs

    def evaluate(model, chunks, policies, *, score_last, full_nll=None, **kw):
        if not policies:
            return _Scored(10.0)
        ((_, policy),) = policies.items()
        return _Scored(_cost(policy, case) if isinstance(policy, Recipe) else 99.0)

    monkeypatch.setattr(RecipeBook, "policy", lambda self, b, *a, **k: self.recipe_for(b))  # the recipe itself
    monkeypatch.setattr(qfilters.evaluate, "evaluate_chunks", evaluate)
    monkeypatch.setattr(rs, "measure_needles", lambda *a: NEEDLES)
    monkeypatch.setattr(rs, "_head_spans", lambda *a: {})  # needs real policies (the fake's are recipes)


@pytest.mark.parametrize("case", ["plain", "interaction", "sensitivity", "head", "blend", "second_pass", "recency",
                                  "recall"])
def test_coordinate_search_path_and_the_stock_candidate(tiny_llama, monkeypatch, case) -> None:
    from qfilters.architecture import compressed_layers

    _fake_evaluator(monkeypatch, case)
    events = []
    filters = QFilters(torch.randn(*tiny_llama.info.filter_shape, generator=torch.Generator().manual_seed(1)))
    search = search_recipes(tiny_llama, [_corpus(0), _corpus(1)], filters, [48, 24], SEARCH, events.append)
    for b in (24, 48):
        expected = {"plain": Recipe("qfilters", 0.25, 4, "pyramid"), "interaction": stock_recipe(b, SEARCH),
                    "sensitivity": Recipe("qfilters", 0.25, 4, "sensitivity"),
                    "head": Recipe("qfilters", 0.25, 4, "head"),
                    "blend": Recipe("qfilters", 0.25, 4, "pyramid", novelty_weight=0.5,
                                    novelty_scorer="content-novelty"),
                    "second_pass": Recipe("qfilters", 0.25, 4, "pyramid", novelty_weight=0.5,
                                          novelty_scorer="content-novelty"),
                    "recency": Recipe("qfilters", 0.25, 4, "pyramid", recency_weight=0.25),
                    "recall": Recipe("qfilters", 0.25, 4, "pyramid", novelty_scorer="content-novelty",
                                     recall_heads=1)}[case]
        assert search.book.by_budget[b] == expected
        assert search.streamingllm[b] == 99.0
    labels = [t["label"] for t in search.trace if t["budget"] == 48]
    assert len(labels) == len(set(labels))  # every recipe is evaluated once per budget
    # later axes are searched with it; novelty reads the keys' content unless the search says otherwise
    tail = {"blend": " blend=0.5 content-novelty", "recency": " age=0.25"}.get(case, "")
    blend = " blend=0.5 content-novelty" if case == "blend" else ""  # the age axis comes after the blend's
    assert {"knorm w=0.25 s=4 uniform", "qfilters w=0.25 s=4 uniform blend=1 content-novelty",
            f"qfilters w=0.25 s=4 uniform{blend} age=0.5",
            f"qfilters w=0.125 s=4 uniform{tail}",
            f"qfilters w=0.25 s=4 sensitivity{tail}"} <= set(labels) and any(" full=1" in label for label in labels)
    # the sensitivity is measured once (every budget reuses it) and shipped only when a chosen recipe allocates by it
    layers = compressed_layers(tiny_llama.model)
    assert search.sensitivity is not None and len(search.sensitivity) == len(layers)
    assert search.book.sensitivity == (tuple(search.sensitivity) if case == "sensitivity" else None)
    assert sum(e.detail == "layer sensitivity" for e in events) == len(layers)  # the search's full pass is reused
    # likewise each KV head's, one pass per head of the compressed layers, shipped only with a head recipe
    n_kv = tiny_llama.model.config.num_key_value_heads
    assert search.head_sensitivity is not None and len(search.head_sensitivity) == tiny_llama.info.filter_shape[0]
    assert sum(e.detail == "KV-head sensitivity" for e in events) == len(layers) * n_kv
    assert search.book.head_sensitivity == (tuple(map(tuple, search.head_sensitivity)) if case == "head" else None)
    # the score spreads a blend or an age discount needs: measured once, shipped only for the scorers a chosen recipe
    # reads them of
    n_layers, n_heads = tiny_llama.info.filter_shape[:2]
    assert search.score_spread is not None and {"qfilters", "knorm", "novelty", "content-novelty"} <= set(
        search.score_spread)
    assert all(len(v) == n_layers and all(len(row) == n_heads for row in v) for v in search.score_spread.values())
    shipped = {"blend": ("qfilters", "content-novelty"), "second_pass": ("qfilters", "content-novelty"),
               "recency": ("qfilters",)}
    assert search.book.score_spread == ({k: search.score_spread[k] for k in shipped[case]}
                                        if case in shipped else None)
    # the 4 KV heads: every share rounds to one recall head; the table travels only with a recipe that reads it
    assert any(label.endswith(" recall=1") for label in labels) and search.needle_attention == NEEDLES
    assert search.book.needle_attention == (NEEDLES if case == "recall" else None)
    steps = [(e.completed, e.total) for e in events]
    assert all(done <= total for done, total in steps) and steps[-1][0] == steps[-1][1]
    assert [d for d, _ in steps] == sorted(d for d, _ in steps)
    # every budget's search settled before the pass cap; the second-pass case needed a second pass to move and a
    # third to see nothing change
    assert search.converged == {24: True, 48: True}
    assert all(search.passes[b] >= (3 if case == "second_pass" else 2) for b in (24, 48))


def test_a_search_stopped_by_the_pass_cap_says_so(tiny_llama, monkeypatch, searched) -> None:
    """With one pass the second-pass case is still moving when the cap stops it: the report says where, so a user
    knows another pass might choose differently."""
    import qfilters.validation.recipe_search as rs

    _fake_evaluator(monkeypatch, "second_pass")
    monkeypatch.setattr(rs, "MAX_PASSES", 1)
    filters = QFilters(torch.randn(*tiny_llama.info.filter_shape, generator=torch.Generator().manual_seed(1)))
    search = search_recipes(tiny_llama, [_corpus(0), _corpus(1)], filters, [48, 24], SEARCH, lambda e: None)
    assert search.passes == {24: 1, 48: 1} and search.converged == {24: False, 48: False}
    section = rs.recipe_report(search)
    assert [(c.search_passes, c.search_converged) for c in section.chosen] == [(1, False), (1, False)]
    run, _ = searched
    capped = run.report.model_copy(update={"recipe": run.report.recipe.model_copy(update={"chosen": [
        c.model_copy(update={"search_passes": 1, "search_converged": b == 48})
        for b, c in zip((24, 48), run.report.recipe.chosen, strict=False)]})})
    text = render_markdown(capped)
    assert "At budget(s) 24 the search hit its cap of 1 passes while still moving" in text
    assert "settled at every budget" in render_markdown(run.report)


def test_search_inputs_are_refused_before_any_forward_pass(tiny_llama) -> None:
    from qfilters.validation.gates import ValidationInputError
    from tests.test_validation import ForwardCounter

    with ForwardCounter(tiny_llama.model) as counter:
        with pytest.raises(ValidationInputError, match="cannot be both"):
            run_validation(tiny_llama, [_corpus(0), _corpus(3)], [_corpus(3)], SEARCH)
        short = replace(SEARCH, eval_seq_len=1500, score_last=64, budgets=(48,))  # calibration docs: ~900 chars
        long_eval = _corpus(5, n_docs=2, words=600)
        with pytest.raises(ValidationInputError, match="searched for a recipe.*eval-seq-len"):
            run_validation(tiny_llama, [_corpus(0), _corpus(1)], [long_eval], short)
    assert counter.calls == 0


def test_passkey_in_the_validation_report_and_its_gate(tiny_llama, monkeypatch) -> None:
    from qfilters.validation.gates import OPTIONAL_GATES
    from qfilters.validation.passkey_check import passkey_warnings
    from qfilters.validation.schema import PasskeyReport

    settings = replace(SEARCH, passkey_trials=3, passkey_context=280)
    long_filler = _corpus(3, n_docs=2, words=400)
    run, events = _run(tiny_llama, settings, evaluation=[long_filler, _corpus(4)])
    pk = run.report.passkey
    assert isinstance(pk, PasskeyReport) and pk.trials == 3 and pk.filler == long_filler.spec
    cells = {(c.policy, c.budget): c for c in pk.rows}
    assert cells["full", None].correct <= 3 and {("recipe", 24), ("streamingllm", 48), ("snapkv", 24)} <= set(cells)
    # the validation's own calibration holds the query moments: the new scorers are reported beside the others
    assert {("meanq", 24), ("gaussian", 48), ("knorm", 24), ("qfilters", 48)} <= set(cells)
    assert "passkey" in {e.phase for e in events}
    gate = next(g for g in run.report.verdict.gates if g.name in OPTIONAL_GATES)
    expected = cells["recipe", 24].accuracy - cells["streamingllm", 24].accuracy  # reference budget 24, shipped recipe
    assert gate.value == round(expected, 6) and gate.passed == (expected >= 0.0)
    assert "### Retrieval under compression (passkey)" in render_markdown(run.report)
    assert 'id="passkey-table"' in render_html(run.report) and 'id="passkey-vs-budget"' in render_html(run.report)
    assert [w for w in run.report.verdict.warnings if w.startswith("Passkey")] == passkey_warnings(pk, "recipe")
    # the search's retrieval gate ran the passkey test on calibration text, never on the held-out filler
    rg = run.report.recipe.retrieval_gate
    assert rg is not None and rg.filler == _corpus(0).spec and rg.trials == 3 and rg.skipped is None
    assert all(c.search_passkey is not None and c.search_streamingllm_passkey is not None
               for c in run.report.recipe.chosen)
    assert "Retrieval gate" in render_markdown(run.report)
    assert "needles (key log-prob) recipe / StreamingLLM" in render_html(run.report)
    chosen = run.report.recipe.chosen
    for c in chosen:  # every candidate's count is reported; the shipped one's is among them
        assert c.search_passkey_candidates[Recipe.from_dict(c.recipe).label] == c.search_passkey
        # the tiny model's 4 KV heads: every share of them rounds to one recall head, a candidate at each budget
        assert any(label.endswith(" recall=1") for label in c.search_passkey_candidates)
    # the recall heads were ranked on calibration passkeys, and the report names them
    heads = run.report.recipe.recall_heads
    assert len(heads) == 4 and [a for *_, a in heads] == sorted((a for *_, a in heads), reverse=True)
    assert "Recall heads: the KV heads" in render_markdown(run.report)
    if any(Recipe.from_dict(c.recipe).recall_heads for c in chosen):  # then the filters carry the table
        assert run.filters.recipe.needle_attention is not None
    failed = any(c.search_key_logprob <= c.search_streamingllm_key_logprob for c in chosen)
    assert all(c.search_key_logprob_candidates[Recipe.from_dict(c.recipe).label] == c.search_key_logprob
               for c in chosen)
    assert ("no candidate beat StreamingLLM" in render_markdown(run.report)) == failed
    # a filler too short for the context is refused before any forward pass
    from qfilters.validation.gates import ValidationInputError

    with pytest.raises(ValidationInputError, match="passkey"):
        _run(tiny_llama, replace(settings, passkey_context=5000), evaluation=[_corpus(3)])



def test_the_retrieval_gate_ships_the_most_likely_keys_within_the_perplexity_tolerance() -> None:
    """Within 1% of the winner's search perplexity, the candidate whose keys are most likely ships, if more likely
    than StreamingLLM's; otherwise the perplexity winner."""
    from qfilters.validation.recipe_search import GATE_PERPLEXITY_TOLERANCE, RetrievalGate, _gated

    assert GATE_PERPLEXITY_TOLERANCE == 0.01
    plain, half, full, recall = (*(Recipe("qfilters", 0.25, 4, novelty_layers=v) for v in (0.0, 0.5, 1.0)),
                                 Recipe("qfilters", 0.25, 4, recall_heads=9))
    ppl = {plain: 10.0, half: 10.08, full: 12.0, recall: 10.1}  # full: 20% worse, never within the tolerance

    def score(r: Recipe, budget: int) -> float:
        return ppl[r]

    def gate(logprob: dict[Recipe, float], streaming: float, skipped: str | None = None) -> RetrievalGate:
        return RetrievalGate("handbook:en", 48, 1024, {128: 7}, {128: {r.label: 5 for r in logprob}}, skipped,
                             {128: streaming}, {128: {r.label: v for r, v in logprob.items()}})

    candidates = [plain, half, full, recall]
    assert _gated(candidates, 128, gate({plain: -13.0, half: -9.0, full: -2.0, recall: -6.0}, -10.0), score) == recall
    assert _gated(candidates, 128, gate({plain: -13.0, half: -9.0, full: -2.0}, -10.0), score) == half  # recall
    # did not fit at the passkey context
    assert _gated(candidates, 128, gate({plain: -9.5, half: -9.5, full: -2.0, recall: -11.0}, -10.0),
                  score) == plain  # ties: the lower perplexity
    assert _gated(candidates, 128, gate({plain: -13.0, half: -10.0, full: -2.0, recall: -10.5}, -10.0),
                  score) == plain  # as likely as StreamingLLM's is not better: none passes, the winner ships
    assert _gated(candidates, 128, gate({}, 0.0, skipped="filler text too short"), score) == plain


def test_the_report_warns_where_the_recipe_loses_to_streamingllm_or_to_stock_qfilters() -> None:
    """A user reading the report must learn where the shipped recipe is the wrong choice: text where recent tokens
    beat it (say StreamingLLM) and budgets where the stock policy beats it (say recipe=None)."""
    from qfilters.validation.recipe_search import recipe_warnings
    from qfilters.validation.schema import DatasetInfo, PerplexityReport, PolicyRow

    def report(spec: str, gaps: dict[tuple[str, int], float]) -> PerplexityReport:
        rows = [PolicyRow(policy="full", budget=None, window=None, perplexity=10.0, gap=0.0)]
        rows += [PolicyRow(policy=p, budget=b, window=8, perplexity=10.0 + g, gap=g) for (p, b), g in gaps.items()]
        return PerplexityReport(dataset=DatasetInfo(spec=spec, sha256="0" * 64, source="s", documents=3, tokens=99),
                                seq_len=64, score_last=32, documents_skipped=0, full_perplexity=10.0, rows=rows,
                                gap_ratio_vs_streamingllm={})

    bible = report("bible", {("streamingllm", 128): 1.0, ("qfilters", 128): 2.0, ("recipe", 128): 0.9,
                             ("streamingllm", 256): 0.5, ("qfilters", 256): 0.4, ("recipe", 256): 0.6})
    austen = report("austen", {("streamingllm", 128): 2.0, ("qfilters", 128): 1.5, ("recipe", 128): 1.0})
    warnings = recipe_warnings([bible, austen])
    assert warnings == [
        "On bible, the searched recipe loses more perplexity than StreamingLLM at budget(s) 256: there, keeping "
        "the sinks and the most recent tokens is the better eviction for this kind of text.",
        "On bible, the searched recipe loses more perplexity than stock Q-Filters at budget(s) 256: there, "
        "QFiltersCache(..., recipe=None) is better.",
    ]


def test_the_report_lists_recall_heads_of_compressed_layers_only() -> None:
    """Gemma-3 compresses 3 of its 18 layers: a sliding-window layer's head (never compressed) is no recall head."""
    from qfilters.validation.recipe_search import _top_recall_heads

    table = ((0.9, 0.2), (0.1, 0.0), (0.5, 0.3))
    assert _top_recall_heads(table, (1, 2)) == [(2, 0, 0.5), (2, 1, 0.3), (1, 0, 0.1), (1, 1, 0.0)]
    assert _top_recall_heads(table, (0, 1, 2), shown=2) == [(0, 0, 0.9), (2, 0, 0.5)]
    assert _top_recall_heads(None, (0,)) is None
