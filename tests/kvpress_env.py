"""An isolated, cached virtualenv holding the real kvpress, for the interoperability tests.

kvpress 0.5.5 needs ``transformers<5.3`` while qfilters runs on transformers 5.x, so the two cannot share an
interpreter. The venv is built once per (kvpress, torch, transformers spec, Python) combination under
``$QFILTERS_CACHE`` (default ``$XDG_CACHE_HOME/qfilters`` or ``~/.cache/qfilters``) and reused afterwards.

* concurrency-safe: built under a file lock, so parallel pytest workers or sessions wait for one build;
* never half-reused: a ``.qfilters-ready.json`` marker is written last, and a directory without it is wiped;
* torch is pinned with a constraints file, so no dependency can make pip swap in a multi-GB CUDA build.

Run ``python tests/kvpress_env.py`` to build (or locate) it by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

KVPRESS_VERSION = "0.5.5"
TRANSFORMERS_SPEC = "transformers>=4.56,<5.3"  # kvpress 0.5.5's own bounds
MARKER = ".qfilters-ready.json"
LOCK_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class KvpressEnv:
    root: Path
    python: Path
    versions: dict[str, str]
    build_seconds: float | None  # None when an existing build was reused


def torch_version() -> str:
    """The torch release to pin: the one qfilters' own venv runs (the local CPU wheel), overridable."""
    pinned = os.environ.get("QFILTERS_TORCH_VERSION")
    if pinned:
        return pinned
    try:
        import torch

        return torch.__version__.split("+")[0]
    except ImportError:  # pragma: no cover - the test venv always has torch
        return "2.13.0"


def cache_root() -> Path:
    base = os.environ.get("QFILTERS_CACHE")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qfilters"


def _spec() -> dict[str, str]:
    return {
        "kvpress": f"kvpress=={KVPRESS_VERSION}",
        "torch": f"torch=={torch_version()}",
        "transformers": TRANSFORMERS_SPEC,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def env_dir() -> Path:
    spec = _spec()
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    name = f"kvpress-venv-{KVPRESS_VERSION}-torch{torch_version()}-py{spec['python']}-{key}"
    return cache_root() / name


def _read_marker(root: Path) -> dict | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("spec") == _spec() else None


def _python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=_clean_env())
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"building the kvpress venv failed at: {' '.join(cmd)}\n--- log tail ({log}) ---\n{tail}")


def _clean_env() -> dict[str, str]:
    """Environment for the isolated interpreter: nothing of qfilters' venv may leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _build(root: Path) -> dict[str, str]:
    if root.exists():
        shutil.rmtree(root)  # a leftover without the marker is a failed or interrupted build
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, env=_clean_env())
    log = root / "build.log"
    python = str(_python(root))
    constraints = root / "constraints.txt"
    # The constraint holds torch even when a dependency (peft, accelerate) asks for "torch>=x".
    constraints.write_text(f"torch=={torch_version()}\n")
    spec = _spec()
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-c", str(constraints)]
    _run(pip + [spec["torch"]], log, timeout=1800)  # first and alone: resolves to the local CPU wheel
    _run(pip + [spec["kvpress"], spec["transformers"], spec["torch"]], log, timeout=1800)
    probe = (
        "import json, torch, transformers, huggingface_hub, safetensors, kvpress, importlib.metadata as m;"
        "print(json.dumps({p: m.version(p) for p in "
        "('kvpress', 'torch', 'transformers', 'huggingface_hub', 'safetensors')}))"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=_clean_env(), timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the kvpress venv at {root} does not import kvpress:\n{out.stderr[-4000:]}")
    versions = json.loads(out.stdout.strip().splitlines()[-1])
    if versions["torch"].split("+")[0] != torch_version():
        raise RuntimeError(f"pip installed torch {versions['torch']} instead of {torch_version()} in {root}")
    return versions


def ensure_kvpress_env() -> KvpressEnv:
    """Return the ready kvpress venv, building it first if needed (idempotent, safe across processes)."""
    from filelock import FileLock

    root = env_dir()
    marker = _read_marker(root)
    if marker is not None:
        return KvpressEnv(root, _python(root), marker["versions"], None)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock", timeout=LOCK_TIMEOUT_S):
        marker = _read_marker(root)  # someone else may have finished while we waited
        if marker is not None:
            return KvpressEnv(root, _python(root), marker["versions"], None)
        start = time.monotonic()
        versions = _build(root)
        seconds = round(time.monotonic() - start, 1)
        tmp = root / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"spec": _spec(), "versions": versions, "build_seconds": seconds}, indent=2))
        os.replace(tmp, root / MARKER)  # written last: only a complete venv is ever reused
        return KvpressEnv(root, _python(root), versions, seconds)


def run_in_env(env: KvpressEnv, script: str, *args: str, extra_env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a Python script (source text) with the kvpress interpreter; raise with its stderr if it fails."""
    full_env = _clean_env()
    full_env.update(extra_env or {})
    proc = subprocess.run(
        [str(env.python), "-c", script, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"kvpress-side script failed (rc={proc.returncode}):\n--- stdout ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


if __name__ == "__main__":
    built = ensure_kvpress_env()
    print(json.dumps({**asdict(built), "root": str(built.root), "python": str(built.python)}, indent=2))
