"""Publication gates: measured numbers against thresholds, and the verdict they add up to.

Each gate has a default threshold that ``--gate name=value`` overrides. A gate passes or fails from its measured value
only; architecture warnings (QK-norm, sliding windows ...) are reported next to the verdict but never decide it.
A gate whose value cannot be measured (for instance StreamingLLM loses nothing at the reference budget, so no ratio
exists) fails, with a reason saying why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from qfilters.errors import QFiltersError
from qfilters.validation.schema import Comparison, GateResult, Verdict, rnd


class ValidationInputError(QFiltersError, ValueError):
    """Bad validation settings or inputs (caught before any forward pass)."""


_COMPARE: dict[Comparison, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    ">": operator.gt,
}


@dataclass(frozen=True)
class Gate:
    name: str
    default: float
    comparison: Comparison  # value <comparison> threshold must hold
    description: str  # one sentence; ``{threshold}`` is filled in


GATES: dict[str, Gate] = {
    g.name: g
    for g in (
        Gate(
            "cross_dataset_cosine", 0.9, ">=",
            "Mean cosine, over every pair of calibration datasets and every (layer, KV head), between the filters "
            "calibrated on each dataset is at least {threshold}.",
        ),
        Gate(
            "gap_ratio_vs_streamingllm", 0.9, "<=",
            "At the reference budget, on every evaluation dataset, the perplexity gap of Q-Filters (vs. full cache) "
            "is at most {threshold} x the gap of StreamingLLM (value: the worst dataset).",
        ),
        Gate(
            "gap_vs_knorm", 0.0, "<",
            "At the reference budget, on every evaluation dataset, gap(Q-Filters) - gap(K-norm) is below {threshold} "
            "(value: the worst dataset; negative means Q-Filters lose less perplexity than K-norm).",
        ),
        Gate(
            "split_half_min", 0.95, ">=",
            "Within every calibration dataset, the lowest cosine over (layer, KV head) between filters from two "
            "halves of the sample is at least {threshold} (the filters are not sampling noise).",
        ),
        Gate(
            "passkey_vs_streamingllm", 0.0, ">=",
            "At the reference budget, the passkey accuracy of the shipped policy (the searched recipe, else "
            "Q-Filters) minus StreamingLLM's is at least {threshold} (only decided when the passkey test ran).",
        ),
    )
}
#: gates decided only when their measurement was asked for (validate --passkey)
OPTIONAL_GATES = frozenset({"passkey_vs_streamingllm"})


def loosened_gates(overrides: Mapping[str, float]) -> list[str]:
    """The gates whose override is MORE permissive than the default (a lower minimum, a higher maximum).

    A service treats these as a privilege: the verdict decides which version an alias such as ``latest`` serves.
    """
    loose = []
    for name, value in overrides.items():
        gate = GATES.get(name)
        if gate is not None and (value < gate.default if gate.comparison in (">=", ">") else value > gate.default):
            loose.append(name)
    return loose


def parse_gate_overrides(items: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """``["name=value", ...]`` (or a mapping) -> the full threshold table (defaults + overrides), in GATES order."""
    thresholds = {name: gate.default for name, gate in GATES.items()}
    if not items:
        return thresholds
    pairs: list[tuple[str, float | str]] = []
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        for item in items:
            name, sep, text = str(item).partition("=")
            if not sep:
                raise ValidationInputError(f"--gate {item!r}: expected NAME=VALUE, e.g. gap_ratio_vs_streamingllm=0.8")
            pairs.append((name.strip(), text.strip()))
    for name, value in pairs:
        if name not in GATES:
            raise ValidationInputError(f"unknown gate {name!r}; gates are: {', '.join(GATES)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValidationInputError(f"gate {name}: threshold {value!r} is not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValidationInputError(f"gate {name}: threshold must be a finite number, got {value!r}")
        thresholds[name] = number
    return thresholds


def evaluate_gate(name: str, threshold: float, value: float | None) -> GateResult:
    gate = GATES[name]
    passed = value is not None and _COMPARE[gate.comparison](value, threshold)
    return GateResult(
        name=name,
        description=gate.description.format(threshold=threshold),
        threshold=threshold,
        value=rnd(value),
        passed=passed,
        comparison=gate.comparison,
    )


@dataclass(frozen=True)
class GateInputs:
    """The measured numbers the gates read (from the report's sections)."""

    cross_dataset_cosine: float | None
    # per evaluation dataset at the reference budget: (spec, gap QF, gap StreamingLLM, gap K-norm)
    reference_gaps: Sequence[tuple[str, float, float, float]]
    split_half_min: Sequence[tuple[str, float]]  # per calibration dataset: (spec, split-half min cosine)
    reference_budget: int
    # at the reference budget: (shipped policy, its passkey accuracy, StreamingLLM's); None when not measured
    passkey: tuple[str, float, float] | None = None


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def gap_ratio(gap_qf: float, gap_baseline: float) -> float | None:
    """gap(QF) / gap(baseline); None when the baseline loses nothing (the ratio would be meaningless)."""
    if gap_baseline <= 0.0:
        return None
    return gap_qf / gap_baseline


def decide(inputs: GateInputs, thresholds: Mapping[str, float], warnings: Sequence[str] = ()) -> Verdict:
    """Evaluate every gate and build the verdict: pass iff all gates pass; one sentence per failed gate."""
    results: list[GateResult] = []
    reasons: list[str] = []
    b = inputs.reference_budget

    # 1. cross-dataset agreement
    t = thresholds["cross_dataset_cosine"]
    g = evaluate_gate("cross_dataset_cosine", t, inputs.cross_dataset_cosine)
    results.append(g)
    if not g.passed:
        reasons.append(
            "The filters depend on the calibration text: mean cross-dataset cosine is "
            f"{_fmt(inputs.cross_dataset_cosine) if inputs.cross_dataset_cosine is not None else 'unmeasured'}, "
            f"below {t}."
        )

    # 2. gap ratio vs StreamingLLM, worst evaluation dataset
    t = thresholds["gap_ratio_vs_streamingllm"]
    ratios = [(spec, gap_ratio(qf, sl)) for spec, qf, sl, _ in inputs.reference_gaps]
    undefined = [spec for spec, r in ratios if r is None]
    worst = max(((spec, r) for spec, r in ratios if r is not None), key=lambda x: x[1], default=None)
    value = None if undefined or worst is None else worst[1]
    g = evaluate_gate("gap_ratio_vs_streamingllm", t, value)
    results.append(g)
    if undefined:
        reasons.append(
            f"StreamingLLM loses no perplexity at budget {b} on {', '.join(undefined)}, so the gain of Q-Filters "
            "cannot be measured there; choose a smaller reference budget."
        )
    elif worst is not None and not g.passed:
        reasons.append(
            f"Q-Filters do not beat the free StreamingLLM baseline by enough: at budget {b} on {worst[0]} their "
            f"perplexity gap is {_fmt(worst[1])} x StreamingLLM's (required: at most {t})."
        )
    elif worst is None:
        reasons.append("No evaluation dataset produced a perplexity gap to compare.")

    # 3. better than K-norm
    t = thresholds["gap_vs_knorm"]
    diffs = [(spec, qf - kn) for spec, qf, _, kn in inputs.reference_gaps]
    worst_k = max(diffs, key=lambda x: x[1], default=None)
    g = evaluate_gate("gap_vs_knorm", t, None if worst_k is None else worst_k[1])
    results.append(g)
    if worst_k is not None and not g.passed:
        reasons.append(
            f"Q-Filters do not beat K-norm: at budget {b} on {worst_k[0]} their perplexity gap exceeds K-norm's by "
            f"{_fmt(worst_k[1])} (required: below {t})."
        )

    # 4. sampling noise
    t = thresholds["split_half_min"]
    worst_s = min(inputs.split_half_min, key=lambda x: x[1], default=None)
    g = evaluate_gate("split_half_min", t, None if worst_s is None else worst_s[1])
    results.append(g)
    if worst_s is not None and not g.passed:
        reasons.append(
            f"The filters are not settled by the calibration sample: on {worst_s[0]} two halves of the sample give "
            f"filters with cosine as low as {_fmt(worst_s[1])} (required: at least {t}); calibrate on more tokens."
        )

    # 5. retrieval (optional): the shipped policy must keep needles at least as well as StreamingLLM
    if inputs.passkey is not None:
        t = thresholds["passkey_vs_streamingllm"]
        shipped, acc, acc_sl = inputs.passkey
        g = evaluate_gate("passkey_vs_streamingllm", t, acc - acc_sl)
        results.append(g)
        if not g.passed:
            reasons.append(
                f"Compressed with the shipped policy ({shipped}), the model loses hidden keys: at budget {b} it finds "
                f"{acc:.0%} of them against StreamingLLM's {acc_sl:.0%} (required: a difference of at least {t})."
            )

    status: Literal["pass", "fail"] = "pass" if all(r.passed for r in results) else "fail"
    return Verdict(status=status, reasons=reasons, warnings=list(warnings), gates=results)
