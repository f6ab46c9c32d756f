"""Is the validator's recipe search reproducible byte for byte across processes, and what does it cost on CPU?

    python bench/bench_recipe_search.py --filters artifacts/smollm2-handbook-en   # SmolLM2, two runs, ~10 min

Each run is a fresh process (``--once``) doing a whole ``--search-recipe`` validation of the given filters
(handbook:en + handbook:fr searched, austen held out; ``--passkey`` needles for the search's retrieval gate on
handbook:en and the held-out check on austen) with ``SOURCE_DATE_EPOCH`` fixed, so its report carries no
wall-clock time. The runs must write identical ``report.json`` and ``qfilters.json`` (the shipped recipe); the search
phase's wall time is read off the validator's own progress events. Prints one JSON object (and ``--out`` keeps it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPOCH = "1764806400"  # any fixed instant: the report's created_at


def _settings(args: argparse.Namespace) -> Any:
    from qfilters.validation.run import ValidationSettings

    return ValidationSettings(tokens_per_dataset=args.tokens, calib_seq_len=1024, eval_seq_len=args.seq_len,
                              score_last=args.seq_len // 2, budgets=tuple(args.budgets), max_docs=args.docs,
                              search_recipe=True, recipe_docs=1, passkey_trials=args.passkey)


def once(args: argparse.Namespace) -> None:
    """One validation in this process: report.json + filters in --out, timings in --out/timing.json."""
    import torch

    from qfilters.models import load_model
    from qfilters.validation.output import write_report
    from qfilters.validation.run import run_validation

    out = Path(args.out)
    lm = load_model("smollm2")
    marks: dict[str, float] = {}

    def progress(event: Any) -> None:  # a qfilters.validation.progress.Progress
        if event.phase == "recipe":
            marks.setdefault("search_start", time.perf_counter())
            marks["search_end"] = time.perf_counter()

    t0 = time.perf_counter()
    run = run_validation(lm, ["handbook:en", "handbook:fr"], ["austen"], _settings(args), filters=args.filters,
                         on_progress=progress)
    total = time.perf_counter() - t0
    write_report(run.report, out)
    run.filters.save_pretrained(out / "filters")
    (out / "timing.json").write_text(json.dumps({"validation_s": total,
                                                 "search_s": marks["search_end"] - marks["search_start"],
                                                 "threads": torch.get_num_threads()}))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", required=True, help="a filter-set directory (the quickstart's artifact)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens per dataset (stability only)")
    parser.add_argument("--seq-len", type=int, default=1024, help="evaluation sequence length; last half scored")
    parser.add_argument("--docs", type=int, default=2, help="held-out austen documents")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--passkey", type=int, default=12,
                        help="passkey needles (the search's retrieval gate and the held-out check; 0: neither)")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.once:
        once(args)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, __file__, "--once", "--out", str(out), "--filters", args.filters,
                   "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--docs", str(args.docs),
                   "--budgets", *map(str, args.budgets), "--passkey", str(args.passkey)]
            subprocess.run(cmd, check=True, env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH})
            runs.append({"report_sha256": _sha(out / "report.json"),
                         "qfilters_json_sha256": _sha(out / "filters" / "qfilters.json"),
                         **json.loads((out / "timing.json").read_text())})
        recipe = json.loads((Path(tmp) / "run0" / "report.json").read_text())["recipe"]
    result = {"command": " ".join(sys.argv), "runs": runs,
              "identical": len({(r["report_sha256"], r["qfilters_json_sha256"]) for r in runs}) == 1,
              "chosen": {c["budget"]: c["description"] for c in recipe["chosen"]},
              "evaluations": recipe["evaluations"]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not result["identical"]:
        sys.exit("the two runs wrote different reports: the search is not reproducible")


if __name__ == "__main__":
    main()
