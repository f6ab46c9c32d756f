"""Issue 13 research driver: moment scorers, recipe search on calibration text, held-out confirmation, passkey.

Every step writes JSON under --out (one file per step, deterministic content; timings in a separate file), so the
steps can run one after the other or be resumed. All perplexities use the exact one-pass evaluator
(qfilters.evaluate.perplexity with a LayerwisePolicy), budgets are per layer on average at a fixed total KV memory.

    python bench/research_recipes.py calibrate --artifact A          # filters + query_stats.safetensors (handbook:en)
    python bench/research_recipes.py search    --artifact A --out R  # sensitivity + coordinate search, handbook:en
    python bench/research_recipes.py confirm   --artifact A --out R --dataset austen --docs 6
    python bench/research_recipes.py passkey   --artifact A --out R --trials 48 --context 1024
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

BUDGETS = (64, 128, 256, 512)
SEQ_LEN, SCORE_LAST = 2048, 1024


def stock_window(budget: int) -> int:
    return min(64, budget // 2)


def load(artifact: str) -> tuple[Any, Any, Any]:
    from qfilters.artifact import QFilters
    from qfilters.models import load_model
    from qfilters.moments import load_moments

    lm = load_model("smollm2")
    if not Path(artifact).exists():  # baselines that need no calibration can run before it finishes
        return lm, None, None
    return lm, QFilters.from_pretrained(artifact), load_moments(artifact)


def scorers(filters: Any, moments: Any) -> dict[str, Any]:
    from qfilters.moment_scorers import GaussianScorer, MeanQueryScorer
    from qfilters.scorers import KNormScorer, QFilterScorer, StreamingLLMScorer

    out: dict[str, Any] = {"streamingllm": StreamingLLMScorer(4), "knorm": KNormScorer()}
    if filters is not None:
        out["qfilters"] = QFilterScorer(filters)
    if moments is not None:
        out.update({"meanq": MeanQueryScorer(moments), "gaussian": GaussianScorer(moments),
                    "gaussian-r4": GaussianScorer(moments, rank=4)})
    return out


def compress_layers(model: Any) -> list[int]:
    from qfilters.architecture import compressed_layers

    return compressed_layers(model)


def chunks(lm: Any, spec: str, docs: int, seq_len: int = SEQ_LEN) -> tuple[list[str], list[torch.Tensor]]:
    from qfilters.data import load_corpus
    from qfilters.data.chunks import encode_document

    titles, out = [], []
    for doc in load_corpus(spec).documents:
        ids = encode_document(lm.tokenizer, doc.text, seq_len)
        if len(ids) == seq_len:
            titles.append(doc.title)
            out.append(torch.tensor([ids]))
        if len(out) == docs:
            break
    return titles, out


def stock_policies(model: Any, scorer: Any, budget: int) -> Any:
    """The paper's/kvpress's setting as evaluated on main: uniform budget, window min(64, b/2), no forced sinks
    (StreamingLLM forces its 4 sinks itself)."""
    from qfilters.policy import EvictionPolicy, LayerwisePolicy

    return LayerwisePolicy.uniform(EvictionPolicy(scorer, budget, stock_window(budget)), compress_layers(model))


def nll(model: Any, data: list[torch.Tensor], policies: Any) -> float:
    from qfilters.onepass import perplexity

    return sum(perplexity(model, ids, policies, SCORE_LAST).nll_sum for ids in data)


def ppl(total_nll: float, data: list[torch.Tensor]) -> float:
    return math.exp(total_nll / (SCORE_LAST * len(data)))


def write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------------ steps
def cmd_calibrate(args: argparse.Namespace) -> None:
    from qfilters.calibrate import CalibrationConfig, calibrate
    from qfilters.data import load_corpus
    from qfilters.models import load_model
    from qfilters.moments import QueryMoments, save_moments

    lm = load_model("smollm2")
    res = calibrate(lm, [load_corpus("handbook:en")], CalibrationConfig(max_tokens=args.tokens))
    res.filters.save_pretrained(args.artifact)
    save_moments(args.artifact, QueryMoments.from_statistics(res.statistics, lm.info.num_kv_heads))


def recipe_for(recipe: Any, model: Any, scorer_map: dict[str, Any], budget: int, sens: list[float] | None) -> dict:
    from qfilters.recipes import layer_policies

    return layer_policies(recipe, scorer_map[recipe.scorer], budget, compress_layers(model), SEQ_LEN, sens)


def cmd_search(args: argparse.Namespace) -> None:
    """Coordinate search on calibration-split text (the first handbook:en documents the calibration consumed)."""
    from dataclasses import replace

    from qfilters.recipes import Recipe, layer_sensitivity

    lm, filters, moments = load(args.artifact)
    model, sc = lm.model, scorers(filters, moments)
    titles, data = chunks(lm, "handbook:en", args.docs)
    t0, c0 = time.perf_counter(), time.process_time()
    full = nll(model, data, {})
    # one layer compressed at a time, on the first 1024 tokens of the first document (last 512 scored): cheap
    sens = (layer_sensitivity(model, [data[0][:, :1024]], sc["gaussian"], 64, 16, 512).nll_increase
            if "sensitivity" in args.allocations else None)
    t_sens = time.perf_counter() - t0
    trace, chosen = [], {}
    for budget in args.budgets:
        cache: dict[Recipe, float] = {}

        def score(r: Recipe, cache: dict[Recipe, float] = cache, budget: int = budget) -> float:
            if r not in cache:
                try:
                    cache[r] = ppl(nll(model, data, recipe_for(r, model, sc, budget, sens)), data)
                except ValueError:  # infeasible at this budget (e.g. a whole layer does not fit)
                    cache[r] = math.inf
                trace.append({"budget": budget, "recipe": r.to_dict(), "perplexity": cache[r]})
            return cache[r]

        best = Recipe("gaussian", 0.25, 4, "uniform")
        axes = [("scorer", args.scorers), ("window_share", [0.125, 0.25, 0.5]), ("n_sinks", [0, 4]),
                ("allocation", args.allocations), ("full_layers", args.full_layers)]
        for field_name, values in axes:
            best = min((replace(best, **{field_name: v}) for v in values), key=lambda r: (score(r), r.label))
        chosen[str(budget)] = {"recipe": best.to_dict(), "perplexity": cache[best],
                               "streamingllm": ppl(nll(model, data, stock_policies(model, sc["streamingllm"], budget)),
                                                   data)}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    write(Path(args.out) / "search.json", {"docs": titles, "full_perplexity": ppl(full, data),
                                          "sensitivity": sens, "chosen": chosen, "trace": trace})
    write(Path(args.out) / "search_timing.json", {"wall_s": seconds, "cpu_s": cpu, "sensitivity_wall_s": t_sens,
                                                 "evaluations": len(trace), "threads": torch.get_num_threads()})


def chosen_recipe(out: Path, budget: int) -> Any:
    """The searched recipe of the nearest searched budget (log scale; ties go to the smaller budget)."""
    from qfilters.recipes import Recipe

    found = json.loads((out / "search.json").read_text())
    searched = sorted(int(b) for b in found["chosen"])
    nearest = min(searched, key=lambda b: (abs(math.log(b / budget)), b))
    return Recipe(**found["chosen"][str(nearest)]["recipe"]), found["sensitivity"]


def cmd_confirm(args: argparse.Namespace) -> None:
    lm, filters, moments = load(args.artifact)
    model, sc = lm.model, scorers(filters, moments)
    out = Path(args.out)
    titles, data = chunks(lm, args.dataset, args.docs)
    t0 = time.perf_counter()
    name = f"confirm-{args.dataset.replace(':', '-')}-{args.tag}"
    full = ppl(nll(model, data, {}), data) if args.full else None  # --no-full: another file of the run has it
    rows: dict[str, dict[str, float]] = {}

    def save() -> None:  # after every cell, so a cut-off run keeps what it measured
        write(out / f"{name}.json", {"dataset": args.dataset, "docs": titles, "full_perplexity": full,
                                     "perplexity": rows})

    for budget in args.budgets:
        if args.recipe:
            recipe, sens = chosen_recipe(out, budget)
            rows.setdefault("recipe", {})[str(budget)] = ppl(
                nll(model, data, recipe_for(recipe, model, sc, budget, sens)), data)
            save()
        for sname in args.scorers:
            if sname in sc and (budget in args.all_scorer_budgets or sname in ("streamingllm", "qfilters")):
                rows.setdefault(sname, {})[str(budget)] = ppl(
                    nll(model, data, stock_policies(model, sc[sname], budget)), data)
                save()
    save()
    write(out / f"{name}_timing.json", {"wall_s": time.perf_counter() - t0})


def cmd_summarize(args: argparse.Namespace) -> None:
    """Markdown tables: perplexity gap / StreamingLLM's gap per policy x budget, per dataset; passkey accuracy."""
    out = Path(args.out)
    by_ds: dict[str, dict[str, Any]] = {}
    for f in sorted(out.glob("confirm-*.json")):
        if f.name.endswith("_timing.json"):
            continue
        d = json.loads(f.read_text())
        entry = by_ds.setdefault(d["dataset"], {"full": None, "docs": d["docs"], "rows": {}})
        entry["full"] = d["full_perplexity"] if d["full_perplexity"] is not None else entry["full"]
        for p, r in d["perplexity"].items():
            entry["rows"].setdefault(p, {}).update(r)
    for ds, e in by_ds.items():
        budgets = sorted({int(b) for r in e["rows"].values() for b in r})
        print(f"\n{ds}: {len(e['docs'])} docs, full-cache perplexity {e['full']:.3f}; cells: perplexity "
              "(gap / gap StreamingLLM)\n")
        print("| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
        print("| --- |" + " --- |" * len(budgets))
        stream = e["rows"]["streamingllm"]
        for p, r in e["rows"].items():
            cells = []
            for b in budgets:
                v = r.get(str(b))
                if v is None:
                    cells.append("-")
                else:
                    g, gs = v - e["full"], stream[str(b)] - e["full"]
                    cells.append(f"{v:.3f} ({g / gs:.3f}x)")
            print(f"| {p} | " + " | ".join(cells) + " |")
    for f in sorted(out.glob("passkey-*.json")):
        if f.name.endswith("_timing.json"):
            continue
        d = json.loads(f.read_text())
        print(f"\n{f.name}: {d['trials']} trials")
        for k, v in d["correct"].items():
            print(f"  {k}: {v}/{d['trials']} ({d['accuracy'][k]:.3f}), mean log p(key) {d['mean_logprob'][k]:.2f}")


def cmd_passkey(args: argparse.Namespace) -> None:
    from qfilters.data import load_corpus
    from qfilters.passkey import SnapKV, make_trials, run_passkey

    lm, filters, moments = load(args.artifact)
    model, sc = lm.model, scorers(filters, moments)
    out = Path(args.out)
    filler = "\n".join(d.text for d in load_corpus("austen").documents)
    trials = make_trials(lm.tokenizer, filler, args.trials, args.context, seed=args.seed)
    policies: dict[str, Any] = {"full": None}
    for budget in args.budgets:
        for name in args.scorers:
            policies[f"{name}@{budget}"] = stock_policies(model, sc[name], budget)
        if args.snapkv:
            policies[f"snapkv@{budget}"] = SnapKV(budget)
        if (out / "search.json").exists():
            from qfilters.recipes import layer_policies

            recipe, sens = chosen_recipe(out, budget)
            policies[f"recipe@{budget}"] = layer_policies(recipe, sc[recipe.scorer], budget, compress_layers(model),
                                                          args.context, sens)
    t0 = time.perf_counter()
    run = run_passkey(model, trials, policies, progress=lambda n: print(f"trial {n}", flush=True))
    write(out / f"passkey-{args.context}-{args.tag}.json", run.to_dict())
    write(out / f"passkey-{args.context}-{args.tag}_timing.json", {"wall_s": time.perf_counter() - t0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("calibrate", "search", "confirm", "passkey", "summarize"):
        s = sub.add_parser(name)
        s.add_argument("--artifact", default="artifacts/smollm2-handbook-en")
        s.add_argument("--out", default="research/issue13")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    sub.choices["calibrate"].add_argument("--tokens", type=int, default=65536)
    se = sub.choices["search"]
    se.add_argument("--docs", type=int, default=2)
    se.add_argument("--scorers", nargs="+", default=["qfilters", "meanq", "gaussian", "gaussian-r4", "knorm"])
    se.add_argument("--allocations", nargs="+", default=["uniform", "pyramid", "sensitivity"])
    se.add_argument("--full-layers", type=int, nargs="+", default=[0, 1])
    c = sub.choices["confirm"]
    c.add_argument("--dataset", default="austen")
    c.add_argument("--docs", type=int, default=6)
    c.add_argument("--scorers", nargs="*", default=["streamingllm", "qfilters", "knorm", "meanq", "gaussian",
                                                    "gaussian-r4"])
    c.add_argument("--all-scorer-budgets", type=int, nargs="*", default=[128, 512])
    c.add_argument("--tag", default="all")
    c.add_argument("--recipe", action=argparse.BooleanOptionalAction, default=True)
    c.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    k = sub.choices["passkey"]
    k.add_argument("--trials", type=int, default=48)
    k.add_argument("--context", type=int, default=1024)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--tag", default="all")
    k.add_argument("--snapkv", action=argparse.BooleanOptionalAction, default=True)
    k.add_argument("--scorers", nargs="*", default=["streamingllm", "knorm", "qfilters", "meanq", "gaussian",
                                                    "gaussian-r4"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"calibrate": cmd_calibrate, "search": cmd_search, "confirm": cmd_confirm, "passkey": cmd_passkey,
     "summarize": cmd_summarize}[args.cmd](args)


if __name__ == "__main__":
    main()
