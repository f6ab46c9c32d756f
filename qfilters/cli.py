"""``qfilters`` command line: calibrate, eval, info, validate, report, publish.

Every command prints a human table by default and machine-readable JSON with ``--json`` (progress then goes to stderr).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qfilters.errors import QFiltersError
from qfilters.policy_table import POLICY_TABLE

if TYPE_CHECKING:
    from qfilters.calibrate import CalibrationProgress
    from qfilters.data import Corpus
    from qfilters.models import LoadedModel

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Q-Filters KV-cache compression: calibrate, evaluate, inspect.")
err = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="Embedded alias (smollm2, gemma3), local directory or Hub model id.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu, cuda, cuda:1.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
AttnOpt = Annotated[str, typer.Option("--attn", help="Attention kernel: sdpa (default) or flash_attention_2.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


def _fail(e: Exception) -> NoReturn:
    err.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(code=2)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(model: str, device: str, dtype: str, attn: str) -> LoadedModel:
    from qfilters.models import load_model

    _quiet_transformers()
    with err.status(f"loading {model} ..."):
        return load_model(model, device=device, dtype=dtype, attn_implementation=attn)


def _load_corpora(specs: list[str]) -> list[Corpus]:
    from qfilters.data import load_corpus, parse_spec

    for spec in specs:  # every spec is checked before any download or model load
        parse_spec(spec)
    corpora = []
    for spec in specs:
        with err.status(f"fetching corpus {spec} ..."):
            corpora.append(load_corpus(spec))
    return corpora


@app.command()
def calibrate(
    model: ModelArg,
    dataset: Annotated[list[str], typer.Option("--dataset", "-d", help="Dataset spec; repeat to mix several.")] = ["handbook:en"],  # noqa: B006
    out: Annotated[Path, typer.Option(help="Directory to write the artifact to.")] = Path("artifacts/qfilters"),
    tokens: Annotated[int, typer.Option(help="Calibration tokens (split evenly across datasets).")] = 65_536,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed (the result is bit-identical for the same inputs).")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Tokens between convergence checkpoints.")] = 16_384,
    until_stable: Annotated[Optional[float], typer.Option(help="Stop once min cosine between checkpoints >= this, e.g. 0.999.")] = None,
    query_stats: Annotated[bool, typer.Option("--query-stats", help="Also store the query moments (query_stats.safetensors) for the meanq/gaussian scorers.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    attn: AttnOpt = "sdpa",
    as_json: JsonOpt = False,
) -> None:
    """Calibrate Q-Filters for MODEL and save them in the kvpress-compatible format."""
    from qfilters.artifact import sha256_file
    from qfilters.calibrate import CalibrationConfig
    from qfilters.calibrate import calibrate as run_calibration

    try:
        config = CalibrationConfig(max_tokens=tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                   checkpoint_every=checkpoint_every, until_stable=until_stable)
        corpora = _load_corpora(dataset)
        lm = _load(model, device, dtype, attn)
        columns = (TextColumn("[bold]calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TextColumn("{task.fields[rate]:>7.0f} tok/s"), TextColumn("{task.fields[agree]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("calibrate", total=tokens, rate=0.0, agree="")

            def on_progress(p: CalibrationProgress) -> None:
                fields: dict[str, Any] = {"rate": p.tokens_per_s}
                if p.checkpoint is not None and p.checkpoint.agreement_min is not None:
                    fields["agree"] = f"min cos vs last checkpoint {p.checkpoint.agreement_min:.5f}"
                progress.update(task, completed=min(p.tokens, tokens), **fields)

            result = run_calibration(lm, corpora, config, on_progress=on_progress)
        path = result.filters.save_pretrained(out)
        if query_stats:
            from qfilters.moments import QueryMoments, save_moments

            save_moments(path, QueryMoments.from_statistics(result.statistics, lm.info.num_kv_heads))
    except QFiltersError as e:
        _fail(e)
    summary = {
        "artifact": str(path),
        "model": lm.info.model_id,
        "shape": list(result.filters.filters.shape),
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "stopped_early": result.stopped_early,
        "checkpoints": [cp.__dict__ for cp in result.checkpoints],
        "model_safetensors_sha256": sha256_file(path / "model.safetensors"),
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"Q-Filters for {lm.info.model_id}: convergence")
    for col in ("tokens", "min cos vs previous", "mean cos vs previous", "split-half min", "split-half mean"):
        table.add_column(col, justify="right")
    fmt = lambda x: "-" if x is None else f"{x:.5f}"  # noqa: E731
    for cp in result.checkpoints:
        table.add_row(f"{cp.tokens:,}", fmt(cp.agreement_min), fmt(cp.agreement_mean), fmt(cp.split_half_min),
                      fmt(cp.split_half_mean))
    Console().print(table)
    Console().print(f"saved {tuple(result.filters.filters.shape)} filters from {result.tokens:,} tokens "
                    f"in {result.seconds:.1f}s to [bold]{path}[/]")


@app.command("eval")
def evaluate(
    model: ModelArg,
    filters: Annotated[str, typer.Option(help="Artifact directory or Hub repo id of the filters.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Evaluation dataset spec.")] = "austen",
    budget: Annotated[list[int], typer.Option(help="KV budget per head (tokens); repeat for a sweep.")] = [128],  # noqa: B006
    window: Annotated[int, typer.Option(help="Recent tokens always kept.")] = 64,
    sinks: Annotated[int, typer.Option(help="Sink tokens for StreamingLLM.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluated chunk (first chunk of each document).")] = 2048,
    score_last: Annotated[int, typer.Option(help="Score only the last N tokens of each chunk.")] = 1024,
    max_docs: Annotated[Optional[int], typer.Option(help="Evaluate at most this many documents.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a perplexity-vs-budget plot (PNG) here.")] = None,
    policy: Annotated[Optional[list[str]], typer.Option(help=f"Policy to compare; repeat. One of {', '.join(n for n, e in POLICY_TABLE.items() if e.scorer is not None)}. Default: Q-Filters, K-norm, StreamingLLM.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    attn: AttnOpt = "sdpa",
    as_json: JsonOpt = False,
) -> None:
    """Perplexity with full cache, Q-Filters, K-norm and StreamingLLM (or --policy ...) under the same KV budget."""
    from qfilters.artifact import QFilters
    from qfilters.evaluate import evaluate_policies

    try:
        names = None if not policy else ["full", *dict.fromkeys(p for p in policy if p != "full")]
        corpus = _load_corpora([dataset])[0]
        lm = _load(model, device, dtype, attn)
        qf = QFilters.from_pretrained(filters, expected_shape=lm.info.filter_shape)
        stats = None
        if names and any("query_stats" in POLICY_TABLE[n].needs for n in names if n in POLICY_TABLE):
            from qfilters.moments import load_moments

            stats = load_moments(filters) if Path(filters).is_dir() else None
        result = evaluate_policies(lm.model, lm.tokenizer, corpus, qf, budgets=sorted(set(budget)), window=window,
                                   seq_len=seq_len, score_last=score_last, n_sinks_streaming=sinks,
                                   policies=names, max_docs=max_docs, progress=True, model_id=lm.info.model_id,
                                   query_stats=stats)
        if plot is not None:
            from qfilters.plots import plot_perplexity_vs_budget

            plot_perplexity_vs_budget(result, plot)
    except (QFiltersError, ValueError) as e:
        _fail(e)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    Console().print(result.table())
    if plot is not None:
        Console().print(f"plot: [bold]{plot}[/]")


@app.command()
def passkey(
    model: ModelArg,
    filters: Annotated[Optional[str], typer.Option(help="Artifact directory of the filters (adds qfilters, and meanq/gaussian when it holds query_stats).")] = None,
    budget: Annotated[list[int], typer.Option(help="KV budget per head (tokens); repeat for a sweep.")] = [128, 256, 512],  # noqa: B006
    window: Annotated[int, typer.Option(help="Recent tokens always kept (static scorers).")] = 64,
    context: Annotated[int, typer.Option(help="Context tokens (filler + needle).")] = 1024,
    trials: Annotated[int, typer.Option(help="Needles (seeded).")] = 48,
    seed: Annotated[int, typer.Option(help="Seed for keys, depths and filler offsets.")] = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    attn: AttnOpt = "sdpa",
    as_json: JsonOpt = False,
) -> None:
    """Passkey retrieval under compression (kvpress protocol: compress the context once, then ask)."""
    from qfilters.passkey import make_trials, run_passkey, standard_policies
    try:
        filler = "\n".join(d.text for d in _load_corpora(["austen"])[0].documents)
        lm = _load(model, device, dtype, attn)
        qf = moments = None
        if filters is not None:
            from qfilters.artifact import QFilters
            from qfilters.moments import load_moments

            qf = QFilters.from_pretrained(filters, expected_shape=lm.info.filter_shape)
            moments = load_moments(filters) if Path(filters).is_dir() else None
        policies = standard_policies(lm.model, sorted(set(budget)), window, qf, moments, context)
        needles = make_trials(lm.tokenizer, filler, trials, context, seed)
        columns = (TextColumn("[bold]passkey"), BarColumn(), MofNCompleteColumn(), TextColumn("needles"),
                   TextColumn(f"x {len(policies)} policies"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err) as progress:  # stderr: --json output stays clean
            task = progress.add_task("passkey", total=len(needles))
            run = run_passkey(lm.model, needles, policies, progress=lambda done: progress.update(task, completed=done))
    except (QFiltersError, ValueError) as e:
        _fail(e)
    if as_json:
        print(json.dumps(run.to_dict(), indent=2))
        return
    table = Table("policy", "correct", "accuracy",
                  title=f"Passkey retrieval, {trials} needles in ~{context} tokens (snapkv needs attention weights)")
    for label in run.hits:
        table.add_row(label, str(sum(run.hits[label])), f"{run.accuracy(label):.3f}")
    Console().print(table)


@app.command()
def info(
    target: Annotated[Optional[str], typer.Argument(help="Artifact dir / Hub repo of filters, or a model. Empty: list what is embedded.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Describe filters (shape, provenance, per-head statistics), a model's architecture facts, or what is embedded."""
    from qfilters.models import resolve_alias

    try:
        if target is None:
            data = _embedded_listing()
        elif resolve_alias(target) is None and _looks_like_artifact(target):
            data = _artifact_info(target)
        else:
            lm = _load(target, "cpu", "float32", "sdpa")
            data = {"model": lm.info.to_dict(), "filter_shape": list(lm.info.filter_shape)}
    except QFiltersError as e:
        _fail(e)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    _print_tree(data)


def _looks_like_artifact(target: str) -> bool:
    p = Path(target)
    if p.exists():
        return (p / "model.safetensors").exists() or (p / "config.json").exists() and not (p / "tokenizer.json").exists()
    return "/" in target  # Hub ids: filters repos are what `info` is mostly used for


def _artifact_info(target: str) -> dict[str, Any]:
    from qfilters.artifact import QFilters

    qf = QFilters.from_pretrained(target)
    prov = qf.provenance
    stats = prov.get("statistics", {})
    out: dict[str, Any] = {"artifact": target, "shape": list(qf.filters.shape)}
    if prov:
        out["base_model"] = prov.get("base_model", {}).get("model_id")
        cal = prov.get("calibration", {})
        out["calibration"] = {k: cal.get(k) for k in ("datasets", "tokens", "seq_len", "seed", "stopped_early")}
        split = [x for row in stats.get("split_half_cosine") or [] for x in row]
        if split:
            out["split_half_cosine"] = {"min": min(split), "mean": round(sum(split) / len(split), 6)}
        sig = [x for row in stats.get("sigma_ratio") or [] for x in row]
        if sig:
            out["sigma_ratio"] = {"min": min(sig), "median": sorted(sig)[len(sig) // 2]}
        out["tensor_sha256"] = qf.artifact_info.get("tensor_sha256")
    else:
        out["provenance"] = "none (third-party artifact)"
    return out


def _embedded_listing() -> dict[str, Any]:
    from qfilters.data import available_specs
    from qfilters.models import EMBEDDED

    return {
        "embedded_models": {alias: spec.hub_id for alias, spec in EMBEDDED.items()},
        "dataset_specs": {pattern: desc for pattern, desc in available_specs()},
    }


def _print_tree(data: dict[str, Any], indent: int = 0) -> None:
    console = Console()
    for key, value in data.items():
        if isinstance(value, dict):
            console.print(" " * indent + f"[bold]{escape(str(key))}[/]")
            _print_tree(value, indent + 2)
        else:
            console.print(" " * indent + f"[bold]{escape(str(key))}[/]: {escape(str(value))}")



# --------------------------------------------------------------------------------------------- validate / report

from qfilters import cli_reports  # noqa: E402,F401  (registers validate, report and publish on ``app``)


def _load_plugins() -> None:
    """Commands other packages add under ``qfilters`` (the registry adds serve, token, db) through the
    ``qfilters.commands`` entry-point group, so this library never imports them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="qfilters.commands"):
        try:
            ep.load()(app)
        except ImportError as e:  # the plugin's extra is not installed: its commands are simply absent
            err.print(f"[yellow]note:[/] commands from {ep.value} unavailable ({e})")


_load_plugins()
