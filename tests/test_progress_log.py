"""In a log (CI, a redirected stderr) the validator's progress prints lines, not bars: when a step starts, now and
then while it runs (a recipe search runs for most of an hour on CPU), and when it ends."""

from __future__ import annotations

from qfilters.cli_reports import _validation_progress
from qfilters.validation.progress import Progress


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]


def test_a_long_step_logs_while_it_runs_not_only_at_its_ends(capsys, monkeypatch) -> None:
    with _validation_progress() as update:
        update(Progress("recipe", "2 calibration document(s)", 0, 10, "budgets 64"))
        update(Progress("recipe", "2 calibration document(s)", 1, 10))
        assert len(_lines(capsys)) == 1  # the start; the next step came too soon to log
        monkeypatch.setattr(_validation_progress, "log_every", 0.0)
        update(Progress("recipe", "2 calibration document(s)", 2, 10))
        update(Progress("recipe", "2 calibration document(s)", 2, 10))  # a repeat (a point to stop at): no line
        monkeypatch.setattr(_validation_progress, "log_every", 3600.0)
        update(Progress("recipe", "2 calibration document(s)", 3, 10))
        update(Progress("recipe", "2 calibration document(s)", 10, 10))
    lines = _lines(capsys)
    assert [line.split("]", 1)[1].strip() for line in lines] == [
        "recipe 2 calibration document(s): 2/10", "recipe 2 calibration document(s): 10/10"]
