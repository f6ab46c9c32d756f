"""Write a validation report to a directory (report.json, report.html, report.md) and read it back.

A thin layer over the renderers (``qfilters.validation.render``), so the engine and the CLI share one JSON form.
"""

from __future__ import annotations

from pathlib import Path

from qfilters.validation.render import load_report, report_json, write_report_files
from qfilters.validation.schema import ValidationReport

__all__ = ["read_report", "report_json", "write_report"]


def write_report(report: ValidationReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json`` (deterministic), ``report.html`` and ``report.md``; returns their paths by kind."""
    return write_report_files(report, Path(out_dir))


def read_report(directory_or_file: str | Path) -> ValidationReport:
    """Load and validate ``report.json`` (a directory holding it, or the file); ``ArtifactError`` says what is wrong."""
    return load_report(Path(directory_or_file))
