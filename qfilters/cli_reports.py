"""``qfilters validate``, ``report`` and ``publish``: the validation report's commands (registered on ``cli.app``)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from qfilters.cli import AttnOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelArg, _fail, _load, app, err
from qfilters.errors import QFiltersError

if TYPE_CHECKING:
    from qfilters.validation.gates import Gate
    from qfilters.validation.progress import Progress as ValidationProgress
    from qfilters.validation.progress import ProgressFn
    from qfilters.validation.schema import ValidationReport

GATES_HELP = ("Override a gate threshold, NAME=VALUE; repeat. Gates: cross_dataset_cosine (>=, default 0.9), "
              "gap_ratio_vs_streamingllm (<=, 0.9), gap_vs_knorm (<, 0.0), split_half_min (>=, 0.95).")


@app.command()
def validate(
    model: ModelArg,
    calib: Annotated[list[str], typer.Option("--calib", "-c", help="Calibration dataset spec; repeat (at least 2).")],
    eval_: Annotated[list[str], typer.Option("--eval", "-e", help="Evaluation dataset spec; repeat.")],
    out: Annotated[Path, typer.Option(help="Directory for report.json/.html/.md and the filters/ artifact.")],
    budget: Annotated[Optional[list[int]], typer.Option(help="KV budget of the sweep; repeat. Default: eval-seq-len / 4, / 8, / 16, / 32.")] = None,
    reference_budget: Annotated[Optional[int], typer.Option(help="Budget the gates and the transfer matrix use. Default: the one closest to 16x compression.")] = None,
    window: Annotated[int, typer.Option(help="Recent tokens always kept; at budget B the window is min(window, B // 2).")] = 64,
    sinks: Annotated[int, typer.Option(help="Sink tokens for StreamingLLM.")] = 4,
    tokens: Annotated[int, typer.Option(help="Calibration tokens PER calibration dataset.")] = 8192,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Calibration sequences per forward pass.")] = 2,
    seed: Annotated[int, typer.Option(help="Calibration seed.")] = 0,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per evaluated chunk (first chunk of each document).")] = 1024,
    score_last: Annotated[int, typer.Option(help="Score only the last N tokens of each chunk.")] = 512,
    max_docs: Annotated[Optional[int], typer.Option(help="Evaluate at most this many documents per evaluation dataset.")] = 6,
    gate: Annotated[Optional[list[str]], typer.Option("--gate", help=GATES_HELP)] = None,
    filters: Annotated[Optional[str], typer.Option(help="Validate this existing artifact (directory or Hub id) instead of publishing the combined filters.")] = None,
    search_recipe: Annotated[bool, typer.Option("--search-recipe", help="Search an eviction recipe (scorer, window share, sinks, per-layer allocation) on calibration text, measure it on the evaluation datasets and store it in the filters' qfilters.json.")] = False,
    recipe_docs: Annotated[int, typer.Option(help="Documents of each calibration dataset the recipe search evaluates.")] = 1,
    passkey: Annotated[int, typer.Option("--passkey", help="Passkey retrieval trials at every budget, in the first evaluation dataset's text (0: not run); adds the passkey_vs_streamingllm gate.")] = 0,
    passkey_context: Annotated[Optional[int], typer.Option(help="Context tokens per passkey trial. Default: min(1024, eval-seq-len).")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    attn: AttnOpt = "sdpa",
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json on stdout instead of a summary.")] = False,
) -> None:
    """Calibrate on each --calib dataset, measure cross-dataset stability and perplexity, decide pass/fail.

    Writes OUT/report.json, OUT/report.html, OUT/report.md and (unless --filters) the combined filters in OUT/filters/
    (kvpress format). Exit code: 0 when the verdict is pass, 1 when it is fail, 2 on bad input (nothing is computed).
    """
    from qfilters.data import parse_spec
    from qfilters.validation.gates import GATES, parse_gate_overrides
    from qfilters.validation.output import report_json, write_report
    from qfilters.validation.run import ValidationSettings, check_settings, run_validation

    try:
        settings = ValidationSettings(
            tokens_per_dataset=tokens, calib_seq_len=calib_seq_len, calib_batch_size=batch_size, seed=seed,
            eval_seq_len=eval_seq_len, score_last=score_last, budgets=tuple(budget) if budget else None,
            window=window, n_sinks=sinks, reference_budget=reference_budget, max_docs=max_docs,
            gates=parse_gate_overrides(gate or []), search_recipe=search_recipe, recipe_docs=recipe_docs,
            passkey_trials=passkey, passkey_context=passkey_context,
        )
        check_settings(settings)
        for spec in [*calib, *eval_]:  # typos fail here, before the model loads
            parse_spec(spec)
        lm = _load(model, device, dtype, attn)
        with _validation_progress() as on_progress:
            run = run_validation(lm, calib, eval_, settings, filters=filters, on_progress=on_progress)
        report = run.report
        files = write_report(report, out)
        if filters is None or search_recipe:  # a searched recipe ships with the filters it was searched for
            files["filters"] = run.filters.save_pretrained(out / "filters")
    except QFiltersError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(report_json(report))
    else:
        _print_verdict(report, files, GATES)
    raise typer.Exit(code=0 if report.verdict.status == "pass" else 1)


class _validation_progress:  # noqa: N801 - used as a context manager like rich's own helpers
    """Rich progress bars on stderr, one per calibration dataset, evaluation dataset and the transfer matrix; where
    stderr is a log (CI, a redirect), a line when a step starts, at most every :attr:`log_every` seconds while it
    runs (a recipe search takes most of an hour on CPU), and when it ends."""

    log_every = 30.0

    def __enter__(self) -> ProgressFn:
        columns = (TextColumn("[bold]{task.fields[phase]:<9}"), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
        self.progress = Progress(*columns, console=err)
        self.start = time.perf_counter()
        self.progress.__enter__()
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.logged_at: dict[tuple[str, str], float] = {}
        self.last: ValidationProgress | None = None
        return self.update

    def update(self, p: ValidationProgress) -> None:
        if p == self.last:  # the run repeats its latest event between layers (a point to stop at): nothing new
            return
        self.last = p
        key = (p.phase, p.label)
        first = key not in self.tasks
        if first:
            self.tasks[key] = self.progress.add_task(escape(p.label), total=p.total, phase=p.phase, detail="")
        self.progress.update(self.tasks[key], completed=p.completed, total=p.total, detail=escape(p.detail))
        now = time.perf_counter()
        due = now - self.logged_at.get(key, now) >= self.log_every
        if not err.is_terminal and (first or due or p.completed >= p.total):  # logs (CI, redirected stderr)
            self.logged_at[key] = now
            err.print(f"[{now - self.start:7.1f}s] {p.phase} {escape(p.label)}: {p.completed}/{p.total} "
                      f"{escape(p.detail)}", highlight=False)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, traceback)


def _print_verdict(report: ValidationReport, files: dict[str, Path], gates: Mapping[str, Gate]) -> None:
    console = Console()
    v = report.verdict
    colour = "green" if v.status == "pass" else "red"
    console.print(f"[bold {colour}]verdict: {v.status.upper()}[/] for {escape(report.model_id)}")
    table = Table(title="gates")
    for col in ("gate", "value", "threshold", "passed"):
        table.add_column(col, justify="left" if col == "gate" else "right")
    for g in v.gates:
        value = "-" if g.value is None else f"{g.value:.4f}"
        table.add_row(g.name, value, f"{g.comparison or ''} {g.threshold:g}", "yes" if g.passed else "[red]no[/]")
    console.print(table)
    ratios = Table(title=f"gap(QF) / gap(StreamingLLM) by budget (reference {report.settings.reference_budget})")
    ratios.add_column("evaluation dataset")
    for b in report.settings.budgets:
        ratios.add_column(str(b), justify="right")
    for p in report.perplexity:
        cells = [p.gap_ratio_vs_streamingllm.get(str(b)) for b in report.settings.budgets]
        ratios.add_row(escape(p.dataset.spec), *["-" if c is None else f"{c:.3f}" for c in cells])
    console.print(ratios)
    for reason in v.reasons:
        console.print(f"[red]-[/] {escape(reason)}")
    for warning in v.warnings:
        console.print(f"[yellow]![/] {escape(warning)}")
    for kind, path in files.items():
        console.print(f"{kind}: [bold]{escape(str(path))}[/]")


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="Directory holding report.json (written by `qfilters validate`).")],
) -> None:
    """Re-render report.html and report.md from DIR/report.json (exit code 2 if it is missing or invalid)."""
    from qfilters.validation.output import read_report, write_report

    try:
        loaded = read_report(directory)
        files = write_report(loaded, directory if directory.is_dir() else directory.parent)
    except QFiltersError as e:
        _fail(e)
    for kind, path in files.items():
        Console().print(f"{kind}: [bold]{escape(str(path))}[/]")


@app.command()
def publish(
    filters: Annotated[Path, typer.Argument(help="Directory of the filters (config.json, model.safetensors, ...).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo, e.g. my-org/SmolLM2-135M-Instruct-qfilters.")],
    report_dir: Annotated[Optional[Path], typer.Option("--report", help="Validation report directory to publish "
                                                       "with the filters (report.json, from `qfilters validate`).")]
    = None,
    tag: Annotated[Optional[str], typer.Option(help="Version tag, e.g. v1.")] = None,
    endpoint: Annotated[Optional[str], typer.Option(help="Hub endpoint (default HF_ENDPOINT or huggingface.co; a "
                                                    "qfilters registry URL works too).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Publish filters (+ model card and report) as one commit of a Hub repo; publishing the same content again
    makes no new commit. The token comes from the file named by QFILTERS_HUB_TOKEN_FILE, else HF_TOKEN / `hf auth
    login`. Exit code 1 when the Hub refuses or fails, 2 on bad input."""
    from qfilters.errors import HubError
    from qfilters.hub import publish as publish_filters

    try:
        result = publish_filters(filters, repo_id, report_dir=report_dir, tag=tag, endpoint=endpoint, private=private)
    except HubError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(code=1) from None
    except QFiltersError as e:
        _fail(e)
    if as_json:
        print(json.dumps({"commit_sha": result.commit_sha, "repo_url": result.repo_url, "tag": result.tag,
                          "created_commit": result.created_commit}))
        return
    what = "committed" if result.created_commit else "unchanged, already at"
    Console().print(f"{escape(result.repo_url)}: {what} [bold]{result.commit_sha}[/]"
                    + (f" (tag {escape(result.tag)})" if result.tag else ""))
