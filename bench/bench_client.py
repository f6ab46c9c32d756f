"""The tiny client in a fresh venv: install size, cold ``import qfilters`` + ``from_pretrained``, warm loads vs
``hf_hub_download`` of the same files.

    .venv/bin/python bench/bench_client.py --json-out client.json
    .venv/bin/python bench/bench_client.py --venv /tmp/qf-client --keep --rounds 15 --calls 200

What it does, on this machine, with no network beyond the package index:

1. makes a fresh venv (``python -m venv``) and installs, with a constraints file pinning torch to the version this
   project's venv runs (the local CPU wheel: nothing may pull a CUDA build), first torch alone, then this checkout as
   a regular (non-editable) package with its base dependencies only: no extras;
2. lists every distribution in the venv with its size on disk (``importlib.metadata`` records), and reports the total,
   torch's own closure (torch and what only it needs: sympy, networkx, ...), and the size without it; checks that
   transformers, FastAPI, SQLAlchemy, Celery, typer, rich and matplotlib are not installed;
3. serves a Llama-3.1-8B-shaped filter set (32 x 8 x 128 float32, with ``qfilters.json``) from ``tests/fake_hub.py``
   (a local Hub stand-in over real HTTP), as ``bench/llama-3.1-8b-qfilters`` tagged ``q-filters`` and
   ``base_model:meta-llama/Llama-3.1-8B``;
4. cold: N fresh processes of the venv's python, each with an empty HF cache, time ``import qfilters`` (+ the
   ``QFilters`` class, which imports torch) and the first ``from_pretrained`` of the base model id (a Hub search, then
   three downloads) and, in other processes, of the repo id;
5. warm: with the cache filled and ``HF_HUB_OFFLINE=1``, one venv process (after the files are 3 s old, see
   ``qfilters.verified``) times, in interleaved rounds of K calls each, ``hf_hub_download`` of the same three files,
   ``QFilters.from_pretrained(repo id)`` and ``QFilters.from_pretrained(base model id)``; reports medians of the
   per-round means and the ratios (target: from_pretrained <= 1.1x hf_hub_download).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

REPO = "bench/llama-3.1-8b-qfilters"
BASE = "meta-llama/Llama-3.1-8B"
SHAPE = (32, 8, 128)
HEAVY = ("transformers", "fastapi", "sqlalchemy", "celery", "typer", "rich", "matplotlib", "accelerate", "uvicorn")

SIZES = r"""
import json, os, sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

dists = {canon(d.metadata["Name"]): d for d in metadata.distributions()}
def size(d):
    total = 0
    for f in d.files or []:
        p = d.locate_file(f)
        if os.path.isfile(p):
            total += os.path.getsize(p)
    return total
def closure(start, skip=()):
    seen, todo = set(), [canon(start)]
    while todo:
        name = todo.pop()
        if name in seen or name in skip or name not in dists:
            continue
        seen.add(name)
        for r in dists[name].requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canon(req.name))
    return seen
sizes = {n: size(d) for n, d in dists.items()}
client = closure("qfilters")
without_torch = closure("qfilters", skip={"torch"})
print(json.dumps({"sizes": sizes, "client": sorted(client), "without_torch": sorted(without_torch),
                  "versions": {n: d.version for n, d in dists.items()}}))
"""

COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import qfilters
t1 = time.perf_counter()
from qfilters import QFilters
t2 = time.perf_counter()
loaded = QFilters.from_pretrained(sys.argv[1], endpoint=sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"import_qfilters": t1 - t0, "import_QFilters": t2 - t0, "from_pretrained": t3 - t2,
                  "kind": loaded.source["kind"], "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""

WARM = r"""
import json, sys, time
from huggingface_hub import hf_hub_download
from qfilters import QFilters
repo, base, rounds, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names = ("config.json", "model.safetensors", "qfilters.json")
def hub():
    for name in names:
        hf_hub_download(repo, name)
def hub_local():
    for name in names:
        hf_hub_download(repo, name, local_files_only=True)
def ours_repo():
    QFilters.from_pretrained(repo)
def ours_base():
    QFilters.from_pretrained(base)
cases = {"hf_hub_download x3": hub, "hf_hub_download x3 (local_files_only=True)": hub_local,
         "from_pretrained(repo id)": ours_repo, "from_pretrained(base model id)": ours_base}
for fn in cases.values():  # warm-up, and a check that each really works offline
    for _ in range(20):
        fn()
assert QFilters.from_pretrained(base).source["kind"] == "hub-search"
per_round = {name: [] for name in cases}
for r in range(rounds):
    order = list(cases.items())
    if r % 2:
        order.reverse()  # no case always runs first
    for name, fn in order:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round[name].append((time.perf_counter() - t) / calls)
print(json.dumps(per_round))
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith(("HF_", "QFILTERS_"))}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def build_venv(venv: Path) -> dict:
    import torch

    torch_version = torch.__version__.split("+")[0]
    if venv.exists():
        shutil.rmtree(venv)
    start = time.monotonic()
    run([sys.executable, "-m", "venv", str(venv)], env=clean_env())
    python = str(venv / "bin" / "python")
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-input", "-c", str(constraints)]
    run(pip + [f"torch=={torch_version}"], env=clean_env(), timeout=1800)
    run(pip + [str(ROOT)], env=clean_env(), timeout=1800)  # the base install: no extras
    return {"python": python, "install_seconds": round(time.monotonic() - start, 1), "torch_pin": torch_version}


def measure_sizes(python: str) -> dict:
    data = json.loads(run([python, "-c", SIZES], env=clean_env(), cwd="/").stdout)
    sizes, versions = data["sizes"], data["versions"]
    client, without_torch = set(data["client"]), set(data["without_torch"])
    torch_only = sorted(client - without_torch)
    infra = {"pip", "setuptools", "wheel"}  # venv tooling, not installed by qfilters
    mib = 1 << 20
    return {
        "client_mib": round(sum(sizes[n] for n in client) / mib, 1),
        "without_torch_mib": round(sum(sizes[n] for n in without_torch) / mib, 1),
        "torch_closure_mib": round(sum(sizes[n] for n in torch_only) / mib, 1),
        "torch_closure": torch_only,
        "without_torch": {n: f"{versions[n]} ({sizes[n] / mib:.1f} MiB)" for n in sorted(without_torch)},
        "installed_but_not_needed": sorted(set(sizes) - client - infra),
        "heavy_installed": [n for n in HEAVY if n in sizes],
    }


def make_artifact(directory: Path) -> Path:
    import torch

    from qfilters.artifact import QFilters

    filters = QFilters(torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)),
                       provenance={"bench": "client", "shape": list(SHAPE)})
    return filters.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=None, help="where to build the fresh venv (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the venv afterwards")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    from fake_hub import FakeHub

    work = Path(tempfile.mkdtemp(prefix="qfilters-bench-client-"))
    venv = args.venv or work / "venv"
    try:
        built = build_venv(venv)
        python = built["python"]
        sizes = measure_sizes(python)
        art = make_artifact(work / "artifact")
        with FakeHub() as hub:
            hub.add_dir(REPO, art, tags=["q-filters", "kv-cache-compression", f"base_model:{BASE}",
                                          "qfilters-verdict:pass"], last_modified="2026-12-01T00:00:00.000Z")
            cold: dict[str, list[dict]] = {"repo": [], "hub-search": []}
            for i in range(args.cold_runs):
                for identifier in (REPO, BASE):  # each in a fresh process with an empty cache
                    env = clean_env(HF_HOME=str(work / f"cold-{i}-{len(cold['repo'])}-{identifier[:4]}"),
                                    QFILTERS_CACHE=str(work / f"cold-qf-{i}-{identifier[:4]}"))
                    start = time.perf_counter()
                    result = json.loads(run([python, "-c", COLD, identifier, hub.url], env=env, cwd="/").stdout)
                    result["process"] = time.perf_counter() - start
                    cold[result.pop("kind")].append(result)
            leaked = sorted({m for runs in cold.values() for r in runs for m in r.pop("modules") if m in HEAVY})
            # fill one cache online, let the files settle, then measure offline
            warm_env = clean_env(HF_HOME=str(work / "warm"), QFILTERS_CACHE=str(work / "warm-qf"),
                                 HF_ENDPOINT=hub.url)
            run([python, "-c", COLD, BASE, hub.url], env=warm_env, cwd="/")
        time.sleep(3)
        warm_env["HF_HUB_OFFLINE"] = "1"
        per_round = json.loads(run([python, "-c", WARM, REPO, BASE, str(args.rounds), str(args.calls)],
                                   env=warm_env, cwd="/").stdout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    warm = {name: round(med(v) * 1e6, 1) for name, v in per_round.items()}
    ratios = {}
    for baseline in ("hf_hub_download x3", "hf_hub_download x3 (local_files_only=True)"):
        for ours in ("from_pretrained(repo id)", "from_pretrained(base model id)"):
            rounds = [o / b for o, b in zip(per_round[ours], per_round[baseline], strict=True)]
            ratios[f"{ours} / {baseline}"] = {"of_medians": round(warm[ours] / warm[baseline], 3),
                                              "per_round_median": round(med(rounds), 3),
                                              "per_round_max": round(max(rounds), 3)}
    summary = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, "
                   f"Python {platform.python_version()})",
        "venv": built, "sizes": sizes, "leaked_heavy_modules": leaked,
        "cold_median_s": {kind: {k: round(med([r[k] for r in runs]), 3) for k in runs[0]}
                          for kind, runs in cold.items()},
        "warm_median_us": warm, "warm_ratios": ratios,
        "artifact": {"shape": list(SHAPE), "files": ["config.json", "model.safetensors", "qfilters.json"]},
    }
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
