"""The house stays easy to see: the library never imports the service; the service uses the library's public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(package: Path) -> set[str]:
    names: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


def test_the_library_never_imports_the_service_packages() -> None:
    imported = _imported_modules(ROOT / "qfilters")
    assert not {m for m in imported if m.split(".")[0] in ("registry", "workers", "migrations")}
    code = ("import sys, qfilters, qfilters.artifact, qfilters.calibrate, qfilters.validation.run, qfilters.cache; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('registry', 'workers', 'fastapi', "
            "'sqlalchemy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_cli_gains_the_service_commands_through_its_plugin_entry_point() -> None:
    from typer.testing import CliRunner

    from qfilters.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "token", "db", "calibrate", "validate"):
        assert command in result.output
