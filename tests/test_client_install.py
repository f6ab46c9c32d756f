"""The tiny client: what the base install declares, what loading imports, and the console script without extras.

(The size and timings of a real fresh base venv are measured by ``bench/bench_client.py``, not here.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
from fake_hub import FakeHub

from qfilters.artifact import QFilters

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("transformers", "accelerate", "gguf", "fastapi", "uvicorn", "sqlalchemy", "alembic", "celery", "typer",
         "rich", "matplotlib", "pydantic", "registry", "workers", "datasets")


def test_the_base_install_brings_only_what_loading_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"])
    assert names == ["huggingface_hub", "numpy", "safetensors", "torch"]
    extras = project["optional-dependencies"]
    assert {"calibrate", "service", "workers", "all", "dev"} <= set(extras)
    assert any(d.startswith("transformers") for d in extras["calibrate"])
    assert any(d.startswith("fastapi") for d in extras["service"])
    assert project["scripts"]["qfilters"] == "qfilters.console:main"


_LOAD = textwrap.dedent(
    """
    import json, sys
    import qfilters
    from qfilters import QFilters
    loaded = [QFilters.from_pretrained(arg).source["kind"] for arg in sys.argv[1:]]
    print(json.dumps({"loaded": loaded, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
    """
)


def test_import_and_from_pretrained_never_import_the_heavy_stacks(tmp_path: Path) -> None:
    art = QFilters(torch.randn(2, 2, 4)).save_pretrained(tmp_path / "art")
    with FakeHub() as hub:
        hub.add_dir("team/tiny-qfilters", art, tags=["q-filters", "base_model:acme/Tiny", "qfilters-verdict:pass"])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QFILTERS_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), QFILTERS_CACHE=str(tmp_path / "qf"),
                   PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-c", _LOAD, str(art), "team/tiny-qfilters", "acme/Tiny"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == ["local", "repo", "hub-search"]
    assert [m for m in HEAVY if m in result["modules"]] == []


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    ("typer", ["info"], "calibrate"),
    ("transformers", ["calibrate", "smollm2", "--dataset", "python-code", "--out", "never-written"], "calibrate"),
])
def test_the_console_script_names_the_missing_extra(tmp_path: Path, blocked: str, argv: list[str], extra: str) -> None:
    # sys.modules[name] = None makes `import name` fail exactly as when the package is not installed
    script = (f"import sys; sys.modules[{blocked!r}] = None; sys.argv = ['qfilters', *{argv!r}]\n"
              "from qfilters.console import main; main()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert f"pip install 'qfilters[{extra}]'" in proc.stderr and repr(blocked) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never-written").exists()
