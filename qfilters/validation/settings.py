"""Validation settings and their checks: what a validation calibrates and evaluates, refused early when wrong.

Torch-free: a service checks a job's settings (:func:`check_settings`) in its API process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qfilters.policy import check_budget
from qfilters.validation.gates import ValidationInputError, parse_gate_overrides

__all__ = ["ValidationSettings", "check_settings"]


@dataclass(frozen=True)
class ValidationSettings:
    """What to calibrate and evaluate, sized by default so that SmolLM2-135M on 5 + 2 datasets takes minutes on a
    laptop CPU (calibration ~ 400 tokens/s, one 1024-token evaluation pass ~ 1 s)."""

    tokens_per_dataset: int = 8192
    calib_seq_len: int = 1024
    calib_batch_size: int = 2
    checkpoint_every: int | None = None  # default: tokens_per_dataset // 4 (four checkpoints per dataset)
    seed: int = 0
    eval_seq_len: int = 1024
    score_last: int = 512
    budgets: tuple[int, ...] | None = None  # default: eval_seq_len / 4, / 8, / 16, / 32
    window: int = 64  # recent tokens always kept; at budget b the window is min(window, b // 2)
    n_sinks: int = 4  # StreamingLLM sinks
    reference_budget: int | None = None  # default: the budget closest to 16x compression (eval_seq_len / 16)
    max_docs: int | None = 6
    gates: Mapping[str, float] = field(default_factory=dict)  # overrides of the default gate thresholds
    # search an eviction recipe on calibration text and ship it with the filters (qfilters.validation.recipe_search)
    search_recipe: bool = False
    recipe_docs: int = 1  # documents of each calibration dataset the search evaluates
    # passkey retrieval (qfilters.passkey) at every budget, in held-out filler; 0 trials: not run
    passkey_trials: int = 0
    passkey_context: int | None = None  # context tokens per trial; default min(1024, eval_seq_len)

    def resolved_passkey_context(self) -> int:
        return self.passkey_context if self.passkey_context is not None else min(1024, self.eval_seq_len)

    def resolved_budgets(self) -> list[int]:
        budgets = list(self.budgets) if self.budgets else [self.eval_seq_len // d for d in (4, 8, 16, 32)]
        if self.reference_budget is not None and self.reference_budget not in budgets:
            budgets.append(self.reference_budget)
        return sorted(set(budgets), reverse=True)

    def resolved_reference_budget(self) -> int:
        if self.reference_budget is not None:
            return self.reference_budget
        target = self.eval_seq_len / 16
        return min(self.resolved_budgets(), key=lambda b: (abs(b - target), b))

    def resolved_checkpoint_every(self) -> int:
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return max(self.calib_seq_len * self.calib_batch_size, self.tokens_per_dataset // 4)

    def window_for(self, budget: int) -> int:
        """The recent-token window used at ``budget``: ``min(window, budget // 2)`` (recorded in every row)."""
        return min(self.window, budget // 2)


def check_settings(s: ValidationSettings) -> dict[str, float]:
    """Raise :class:`ValidationInputError` on any inconsistent setting; return the gate thresholds."""
    ints = {
        "tokens_per_dataset": s.tokens_per_dataset, "calib_seq_len": s.calib_seq_len,
        "calib_batch_size": s.calib_batch_size, "eval_seq_len": s.eval_seq_len, "score_last": s.score_last,
    }
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValidationInputError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("window", s.window), ("n_sinks", s.n_sinks), ("seed", s.seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValidationInputError(f"{name} must be a non-negative integer, got {value!r}")
    if s.checkpoint_every is not None and s.checkpoint_every <= 0:
        raise ValidationInputError(f"checkpoint_every must be positive, got {s.checkpoint_every}")
    if not isinstance(s.search_recipe, bool):
        raise ValidationInputError(f"search_recipe must be true or false, got {s.search_recipe!r}")
    if isinstance(s.recipe_docs, bool) or not isinstance(s.recipe_docs, int) or s.recipe_docs <= 0:
        raise ValidationInputError(f"recipe_docs must be a positive integer, got {s.recipe_docs!r}")
    if isinstance(s.passkey_trials, bool) or not isinstance(s.passkey_trials, int) or s.passkey_trials < 0:
        raise ValidationInputError(f"passkey_trials must be a non-negative integer, got {s.passkey_trials!r}")
    if not s.passkey_trials and s.passkey_context is not None:
        raise ValidationInputError(f"passkey_context={s.passkey_context} does nothing without passkey trials: "
                                   "set passkey_trials (e.g. 48) or drop passkey_context")
    if s.passkey_trials and s.resolved_passkey_context() < 64:
        raise ValidationInputError(f"passkey_context must be at least 64 tokens, got {s.passkey_context}")
    if s.max_docs is not None and s.max_docs <= 0:
        raise ValidationInputError(f"max_docs must be positive, got {s.max_docs}")
    if s.tokens_per_dataset < s.calib_seq_len:
        raise ValidationInputError(
            f"{s.tokens_per_dataset} calibration tokens per dataset is less than one {s.calib_seq_len}-token "
            "sequence: raise --tokens or lower --calib-seq-len"
        )
    if not 1 <= s.score_last <= s.eval_seq_len - 1:
        raise ValidationInputError(
            f"score_last ({s.score_last}) must be between 1 and eval_seq_len - 1 ({s.eval_seq_len - 1})"
        )
    for b in s.resolved_budgets():
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValidationInputError(f"budgets must be positive integers, got {b!r}")
        if b >= s.eval_seq_len:
            raise ValidationInputError(
                f"budget {b} is not below the evaluation length ({s.eval_seq_len} tokens): nothing would be evicted"
            )
        try:
            check_budget(b, s.window_for(b), s.n_sinks)
        except ValueError as e:
            raise ValidationInputError(
                f"budget {b} leaves no slot to choose: window {s.window_for(b)} + {s.n_sinks} StreamingLLM sinks "
                f"already take {s.window_for(b) + s.n_sinks} of its {b} slots; use budgets of at least "
                f"{2 * (s.n_sinks + 1)}"
            ) from e
    return parse_gate_overrides(s.gates)
