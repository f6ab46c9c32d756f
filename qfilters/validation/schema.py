"""The validation report: one pydantic document, versioned, that the CLI writes, the HTML/Markdown renderers read
and the registry stores and serves.

Everything except ``created_at`` is a deterministic function of the inputs, so re-running a validation reproduces
the JSON byte for byte apart from that field. Matrices are nested lists (rows first) with fixed rounding.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal, overload

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from qfilters.policy_table import POLICY_TABLE

SCHEMA_VERSION: Final = "1"


def _known_policy(name: str) -> str:
    if name not in POLICY_TABLE:
        raise ValueError(f"unknown policy {name!r}; the policy table has {list(POLICY_TABLE)}")
    return name


Policy = Annotated[str, AfterValidator(_known_policy)]  # a name from qfilters.policy_table
Comparison = Literal[">=", "<=", "<", ">"]  # how a gate compares its measured value with its threshold


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetInfo(_Strict):
    spec: str
    sha256: str
    source: str
    documents: int
    tokens: int  # tokens used (calibration) or scored (evaluation)


class ArchitectureRisk(_Strict):
    """Facts of the model that the paper ties to Q-Filters' success or failure, plus measured anisotropy."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    qkv_bias: bool
    rope: bool
    sliding_window: int | None
    sliding_layers: list[int]
    compressed_layers: list[int]  # layers whose cache Q-Filters actually evict (full-attention layers)
    sigma_ratio_median: float | None = None  # measured after calibration; None before
    sigma_ratio_min: float | None = None
    positive_share_median: float | None = None
    warnings: list[str] = Field(default_factory=list)  # plain-language sentences for people


class CosineSummary(_Strict):
    mean: float
    min: float
    p5: float
    share_above: float  # share of (layer, kv head) pairs with cosine >= threshold
    threshold: float


class StabilityReport(_Strict):
    """Cross-dataset stability: filters calibrated on each dataset, compared head by head."""

    datasets: list[str]  # K calibration specs, in the order of every matrix below
    mean_cosine: list[list[float]]  # [K][K]
    min_cosine: list[list[float]]  # [K][K]
    summary: CosineSummary  # over all (i < j) pairs and all heads
    per_head_min: list[list[float]]  # [L][H_kv]: min over pairs i < j
    per_layer_mean: list[float]  # [L]: mean over pairs and heads


class SamplingStability(_Strict):
    """Within one dataset: how much filters move with the sample (tells noise from a real difference)."""

    dataset: str
    split_half: CosineSummary
    checkpoints: list[dict]  # CalibrationResult checkpoints as dicts (tokens, agreement_min/mean, split_half_min/mean)
    tokens_to_stable: int | None  # first checkpoint whose agreement_min >= the stability threshold; None if never
    stable_threshold: float


class PolicyRow(_Strict):
    policy: Policy
    budget: int | None  # None for the full cache
    window: int | None
    perplexity: float
    gap: float  # perplexity - full-cache perplexity


class PerplexityReport(_Strict):
    """One evaluation dataset, the published filters, a sweep of budgets."""

    dataset: DatasetInfo
    seq_len: int
    score_last: int
    documents_skipped: int
    full_perplexity: float
    rows: list[PolicyRow]
    # str(budget) -> gap(QF) / gap(StreamingLLM); None where StreamingLLM loses nothing (ratio undefined)
    gap_ratio_vs_streamingllm: dict[str, float | None]


class TransferMatrix(_Strict):
    """Filters calibrated on dataset i (rows; last row = combined) evaluated on dataset j (columns) at one budget."""

    budget: int
    window: int
    calibration: list[str]  # row labels
    evaluation: list[str]  # column labels
    perplexity: list[list[float]]
    gap_ratio_vs_streamingllm: list[list[float | None]]  # None where StreamingLLM loses nothing on that column


class GateResult(_Strict):
    name: str
    description: str
    threshold: float
    value: float | None
    passed: bool
    comparison: Comparison | None = None  # passed == (value <comparison> threshold)


class Verdict(_Strict):
    status: Literal["pass", "fail"]
    reasons: list[str]  # why it failed, one sentence each; empty on pass
    warnings: list[str]
    gates: list[GateResult]


class Settings(_Strict):
    calibration: list[str]
    evaluation: list[str]
    tokens_per_dataset: int
    calib_seq_len: int
    seed: int
    eval_seq_len: int
    score_last: int
    budgets: list[int]
    window: int
    n_sinks: int
    reference_budget: int
    max_docs: int | None
    gates: dict[str, float]
    calib_batch_size: int = 4
    checkpoint_every: int | None = None  # calibration tokens between convergence checkpoints
    filters: str | None = None  # an existing artifact validated instead of the combined filters (validate --filters)
    search_recipe: bool = False  # an eviction recipe was searched on calibration text (see ValidationReport.recipe)
    recipe_docs: int = 1
    passkey_trials: int = 0  # 0: no passkey retrieval test


class PasskeyCell(_Strict):
    policy: Policy
    budget: int | None  # None for the full cache
    correct: int
    accuracy: float


class PasskeyReport(_Strict):
    """Retrieval under compression: a five-digit key hidden in held-out filler, the context compressed once."""

    filler: str  # the evaluation dataset whose text is the filler
    trials: int
    context_tokens: int
    seed: int
    rows: list[PasskeyCell]


class RecipeChoice(_Strict):
    """The recipe chosen at one budget, with what it and StreamingLLM scored on the search text."""

    budget: int
    recipe: dict[str, Any]  # qfilters.recipes.Recipe.to_dict()
    description: str
    search_perplexity: float
    search_streamingllm_perplexity: float
    search_passkey: int | None = None  # needles the recipe retrieved on calibration text (retrieval gate)
    search_streamingllm_passkey: int | None = None
    search_passkey_candidates: dict[str, int] | None = None  # every candidate of the gate, by recipe label
    # the gate's measure: mean teacher-forced log-probability of the key's tokens on the same calibration passkeys
    search_key_logprob: float | None = None
    search_streamingllm_key_logprob: float | None = None
    search_key_logprob_candidates: dict[str, float] | None = None
    search_passes: int | None = None  # passes of the coordinate search over the axes (None: older reports)
    search_converged: bool | None = None  # False: the pass cap stopped a search that was still moving


class RetrievalGateReport(_Strict):
    """The recipe search's passkey check on calibration text (see qfilters.validation.recipe_search)."""

    filler: str
    trials: int
    context_tokens: int
    skipped: str | None = None  # why it did not run


class RecipeReport(_Strict):
    """The eviction recipe searched on calibration text only, stored in the published filters' qfilters.json."""

    searched_on: str
    documents: list[str]
    search_full_perplexity: float
    evaluations: int  # one-pass evaluations the search ran (its cost)
    chosen: list[RecipeChoice]
    retrieval_gate: RetrievalGateReport | None = None
    # the KV heads reading a passkey most on calibration passkeys: [layer, KV head, needle attention], best first
    recall_heads: list[tuple[int, int, float]] | None = None


class ValidationReport(_Strict):
    schema_version: Literal["1"] = SCHEMA_VERSION
    created_at: str  # ISO 8601 UTC; the only field that differs between identical runs
    qfilters_version: str
    model_id: str
    model_revision: str | None
    model_source: str
    settings: Settings
    calibration_datasets: list[DatasetInfo]
    architecture: ArchitectureRisk
    stability: StabilityReport
    sampling: list[SamplingStability]
    perplexity: list[PerplexityReport]
    transfer: TransferMatrix
    verdict: Verdict
    artifact_sha256: str | None = None  # model.safetensors of the published (combined) filters
    recipe: RecipeReport | None = None  # the searched recipe (validate --search-recipe); its rows are in perplexity
    passkey: PasskeyReport | None = None  # validate --passkey N


@overload
def rnd(x: float, digits: int = 6) -> float: ...
@overload
def rnd(x: None, digits: int = 6) -> None: ...
@overload
def rnd(x: float | None, digits: int = 6) -> float | None: ...


def rnd(x: float | None, digits: int = 6) -> float | None:
    """Round for the report; ``-0.0`` becomes ``0.0`` so the JSON never depends on the sign of a zero."""
    if x is None:
        return None
    if not math.isfinite(x):
        raise ValueError(f"cannot put a non-finite number ({x}) in the report")
    return round(float(x), digits) + 0.0
