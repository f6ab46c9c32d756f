"""The versioned job spec a runner reads off the job row: not the HTTP request schema.

The API validates a request once, at submission, and stores it canonical (``Job.request``, ``Job.spec_version``).
Workers read it back through :meth:`JobSpec.from_row`, so a job queued before the API's schema changed still runs:
a new version adds a branch here, old rows keep their meaning.

Versions: 1, the first; 2 adds ``search_recipe``/``recipe_docs``; 3 adds ``passkey_trials``/``passkey_context``.
A job is written at the lowest version that holds what it asks for (:func:`spec_version`), so workers that predate a
field refuse the jobs that use it instead of silently skipping it, and run all others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CURRENT_VERSION = 3


class SpecError(ValueError):
    """The stored spec cannot be read by this version of the workers (a newer API wrote it)."""


@dataclass(frozen=True)
class JobSpec:
    model: str
    revision: str
    datasets: list[str]
    eval_datasets: list[str]
    tokens: int
    seq_len: int
    batch_size: int
    eval_seq_len: int
    score_last: int | None
    seed: int
    budgets: list[int] | None
    window: int
    max_docs: int | None
    gates: dict[str, float] = field(default_factory=dict)
    publish_to: str | None = None
    force_publish: bool = False
    search_recipe: bool = False
    recipe_docs: int = 1
    passkey_trials: int = 0
    passkey_context: int | None = None

    @classmethod
    def from_row(cls, version: int | None, request: dict[str, Any]) -> JobSpec:
        if (version or 1) > CURRENT_VERSION:
            raise SpecError(f"job spec version {version} is newer than this worker understands ({CURRENT_VERSION}): "
                            "upgrade the workers")
        r = request
        return cls(model=r["model"], revision=r.get("revision") or "main", datasets=list(r["datasets"]),
                   eval_datasets=list(r["eval_datasets"]), tokens=int(r["tokens"]), seq_len=int(r["seq_len"]),
                   batch_size=int(r.get("batch_size", 2)), eval_seq_len=int(r["eval_seq_len"]),
                   score_last=r.get("score_last"), seed=int(r.get("seed", 0)), budgets=r.get("budgets"),
                   window=int(r.get("window", 64)), max_docs=r.get("max_docs"), gates=dict(r.get("gates") or {}),
                   publish_to=r.get("publish_to"), force_publish=bool(r.get("force_publish", False)),
                   search_recipe=bool(r.get("search_recipe", False)), recipe_docs=int(r.get("recipe_docs", 1)),
                   passkey_trials=int(r.get("passkey_trials", 0)), passkey_context=r.get("passkey_context"))

    @classmethod
    def of(cls, job: Any) -> JobSpec:
        return cls.from_row(job.spec_version, job.request)

    def validation_settings(self) -> Any:
        """The library's ``ValidationSettings`` (the same mapping as the request schema's)."""
        from qfilters.validation.run import ValidationSettings

        return ValidationSettings(
            tokens_per_dataset=self.tokens, calib_seq_len=self.seq_len, calib_batch_size=self.batch_size,
            seed=self.seed, eval_seq_len=self.eval_seq_len, score_last=self.score_last or self.eval_seq_len // 2,
            budgets=tuple(self.budgets) if self.budgets else None, window=self.window, max_docs=self.max_docs,
            gates=dict(self.gates), search_recipe=self.search_recipe, recipe_docs=self.recipe_docs,
            passkey_trials=self.passkey_trials, passkey_context=self.passkey_context)


def spec_version(request: dict[str, Any]) -> int:
    """The lowest spec version that holds what a job asks for (its canonical request)."""
    if request.get("passkey_trials"):
        return 3
    return 2 if request.get("search_recipe") else 1
