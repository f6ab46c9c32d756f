"""Write a validation report to a directory (report.json, report.html, report.md) and read it back.

Thin layer over the renderers in ``qfilters.validation.render``; falls back to ``report.json`` alone if they are
missing (temporary, while the renderers are being written).
"""

from __future__ import annotations

from pathlib import Path

from qfilters.validation.schema import ValidationReport

REPORT_JSON = "report.json"


def report_json(report: ValidationReport) -> str:
    """Deterministic JSON: field order of the schema, fixed indentation, trailing newline."""
    return report.model_dump_json(indent=2) + "\n"


def write_report(report: ValidationReport, out_dir: str | Path) -> dict[str, Path]:
    """Write the report files into ``out_dir``; returns ``{"json": path, "html": path, "md": path}``."""
    out = Path(out_dir)
    try:
        from qfilters.validation.render import write_report_files
    except ImportError:  # pragma: no cover - temporary fallback
        out.mkdir(parents=True, exist_ok=True)
        path = out / REPORT_JSON
        path.write_text(report_json(report), encoding="utf-8")
        return {"json": path}
    return write_report_files(report, out)


def read_report(directory_or_file: str | Path) -> ValidationReport:
    """Load and validate ``report.json`` (a directory holding it, or the file); a QFiltersError says what is wrong."""
    try:
        from qfilters.validation.render import load_report
    except ImportError:  # pragma: no cover - temporary fallback
        from qfilters.validation.gates import ValidationInputError

        path = Path(directory_or_file)
        path = path / REPORT_JSON if path.is_dir() else path
        try:
            return ValidationReport.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValidationInputError(f"{path}: not a readable validation report ({e})") from e
    return load_report(Path(directory_or_file))
