"""A ``ValidationReport`` on disk: ``report.json``, ``report.html`` and ``report.md``, written and read back.

The page is rendered by :mod:`qfilters.validation.html_page` and the model-card section by
:mod:`qfilters.validation.markdown`; this module writes all three forms at once (atomically) and loads a report with
errors that say what is wrong with the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from qfilters.errors import ArtifactError
from qfilters.fileio import atomic_write_text
from qfilters.validation.html_page import render_html
from qfilters.validation.markdown import render_markdown
from qfilters.validation.schema import SCHEMA_VERSION, ValidationReport

__all__ = ["REPORT_FILES", "load_report", "render_html", "render_markdown", "report_json", "write_report_files"]

REPORT_FILES = {"json": "report.json", "html": "report.html", "md": "report.md"}

def report_json(report: ValidationReport) -> str:
    """The canonical JSON text of a report (what ``report.json`` holds)."""
    return report.model_dump_json(indent=2) + "\n"


def write_report_files(report: ValidationReport, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``report.md`` into ``out_dir``; returns their paths by kind.

    Everything is rendered before anything is written, and each file is replaced atomically
    (:func:`qfilters.fileio.atomic_write_text`), so a reader never sees a half-written file.
    """
    out_dir = Path(out_dir)
    texts = {"json": report_json(report), "html": render_html(report), "md": render_markdown(report)}
    out_dir.mkdir(parents=True, exist_ok=True)
    return {kind: atomic_write_text(out_dir / name, texts[kind]) for kind, name in REPORT_FILES.items()}


def load_report(path: Path) -> ValidationReport:
    """Read ``report.json`` (or the ``report.json`` inside a directory); :class:`ArtifactError` says what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILES["json"]
    hint = "run `qfilters validate` to produce one"
    if not path.is_file():
        raise ArtifactError(path, f"no validation report here (file not found); {hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(path, f"cannot read the validation report ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the file is "
                                  f"damaged or not a validation report; {hint}") from None
    if not isinstance(data, dict):
        raise ArtifactError(path, f"expected a JSON object (a validation report), found {type(data).__name__}")
    version = data.get("schema_version")
    if version is None:
        raise ArtifactError(path, "no schema_version: this is not a qfilters validation report")
    if version != SCHEMA_VERSION:
        raise ArtifactError(path, f"validation report schema_version {version!r}, but this qfilters reads version "
                                  f"{SCHEMA_VERSION!r}; use the qfilters release that wrote it, or re-run "
                                  "`qfilters validate`")
    try:
        return ValidationReport.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                             for err in e.errors()[:5])
        more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
        raise ArtifactError(path, f"does not match the validation report schema {SCHEMA_VERSION}: {problems}{more}") \
            from None
