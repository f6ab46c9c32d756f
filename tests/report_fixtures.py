"""Realistic synthetic validation reports for the renderer's tests (no model, no forward pass, fully deterministic).

``make_report(passing=True)`` looks like SmolLM2-135M validated on five calibration and two evaluation corpora:
30 layers x 3 KV heads, all cosines well above 0.9, Q-Filters clearly ahead of StreamingLLM and K-norm.
``make_report(passing=False)`` looks like a QK-norm model with sliding-window layers: architecture warnings, heads
whose filters flip between datasets, a gap ratio above the gate and one noisy calibration corpus.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from qfilters.validation.schema import (
    ArchitectureRisk,
    CosineSummary,
    DatasetInfo,
    GateResult,
    PerplexityReport,
    PolicyRow,
    SamplingStability,
    Settings,
    StabilityReport,
    TransferMatrix,
    ValidationReport,
    Verdict,
)

CALIBRATION = ["handbook:en", "austen", "python-docs", "python-code", "fortunes:en"]
EVALUATION = ["austen", "handbook:fr"]
BUDGETS = [64, 128, 256, 512]
REFERENCE_BUDGET = 128
WINDOW = 32
THRESHOLD = 0.9


def _r(x: float, digits: int = 6) -> float:
    return round(float(x), digits) + 0.0


def _sha(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(64))


def _dataset(spec: str, rng: random.Random, tokens: int, source: str = "debian") -> DatasetInfo:
    return DatasetInfo(spec=spec, sha256=_sha(rng), source=source, documents=rng.randint(6, 400), tokens=tokens)


def _summary(values: Sequence[float], threshold: float) -> CosineSummary:
    v = sorted(values)
    p5 = v[max(0, math.ceil(0.05 * len(v)) - 1)]
    return CosineSummary(mean=_r(sum(v) / len(v)), min=_r(v[0]), p5=_r(p5),
                         share_above=_r(sum(x >= threshold for x in v) / len(v)), threshold=threshold)


def _gate(name: str, description: str, threshold: float, value: float | None, comparison: str) -> GateResult:
    ops = {">=": value is not None and value >= threshold, "<=": value is not None and value <= threshold,
           "<": value is not None and value < threshold}
    fields = dict(name=name, description=description.format(threshold=threshold), threshold=threshold,
                  value=None if value is None else _r(value), passed=ops[comparison])
    if "comparison" in GateResult.model_fields:  # the field is new in the schema; keep working either way
        fields["comparison"] = comparison
    return GateResult(**fields)


def make_report(
    passing: bool = True,
    *,
    calibration: Sequence[str] = CALIBRATION,
    evaluation: Sequence[str] = EVALUATION,
    num_layers: int | None = None,
    num_kv_heads: int = 3,
    seed: int = 0,
) -> ValidationReport:
    """A complete ``ValidationReport``; ``passing`` picks the healthy model or the failing one."""
    rng = random.Random(seed * 2 + (0 if passing else 1))
    layers = num_layers if num_layers is not None else 30
    heads = num_kv_heads
    k = len(calibration)
    tokens = 65_536
    sliding_layers = [] if passing else [i for i in range(layers) if i % 6 != 5]
    compressed = [i for i in range(layers) if i not in sliding_layers]

    # ---- cross-dataset cosines per pair and head: close to 1; the failing model has unstable heads
    bad_heads = set() if passing else {(3, 1 % heads), (11, 0), (17, heads - 1), (22, 2 % heads), (29 % layers, 0)}
    pair_cos: dict[tuple[int, int], list[list[float]]] = {}
    for i in range(k):
        for j in range(i + 1, k):
            distance = 0.004 if passing else 0.02
            distance *= 1.0 + 0.6 * (abs(i - j) == 1) + 1.2 * ("code" in calibration[i] + "code" in calibration[j])
            grid = []
            for layer in range(layers):
                depth = 1.0 + (2.5 if layer in (0, layers - 1) else 0.0)
                row = []
                for h in range(heads):
                    c = 1.0 - distance * depth * rng.uniform(0.05, 1.4)
                    if (layer, h) in bad_heads:
                        c = rng.uniform(0.35, 0.88)
                    row.append(_r(max(-1.0, min(1.0, c))))
                grid.append(row)
            pair_cos[(i, j)] = grid
    mean_m = [[1.0] * k for _ in range(k)]
    min_m = [[1.0] * k for _ in range(k)]
    for (i, j), grid in pair_cos.items():
        flat = [c for row in grid for c in row]
        mean_m[i][j] = mean_m[j][i] = _r(sum(flat) / len(flat))
        min_m[i][j] = min_m[j][i] = _r(min(flat))
    all_values = [c for grid in pair_cos.values() for row in grid for c in row]
    per_head_min = [[_r(min(pair_cos[p][layer][h] for p in pair_cos)) for h in range(heads)] for layer in range(layers)]
    per_layer_mean = [_r(sum(pair_cos[p][layer][h] for p in pair_cos for h in range(heads)) / (len(pair_cos) * heads))
                      for layer in range(layers)]
    stability = StabilityReport(datasets=list(calibration), mean_cosine=mean_m, min_cosine=min_m,
                                summary=_summary(all_values, THRESHOLD), per_head_min=per_head_min,
                                per_layer_mean=per_layer_mean)

    # ---- sampling: checkpoints every 8k tokens, agreement rising towards 1
    sampling = []
    stable = 0.999
    for index, spec in enumerate(calibration):
        noisy = (not passing) and index == k - 1
        checkpoints = []
        for step in range(1, 9):
            t = step * 8192
            agree = None if step == 1 else 1.0 - (0.05 if noisy else 0.012) / (step - 1) ** 1.6 * rng.uniform(0.8, 1.2)
            split = 1.0 - (0.6 if noisy else 0.03) / step ** 1.1 * rng.uniform(0.8, 1.2)
            checkpoints.append({
                "tokens": t,
                "agreement_min": None if agree is None else _r(agree),
                "agreement_mean": None if agree is None else _r(1.0 - (1.0 - agree) / 6),
                "split_half_min": _r(split),
                "split_half_mean": _r(1.0 - (1.0 - split) / 8),
            })
        to_stable = next((cp["tokens"] for cp in checkpoints
                          if cp["agreement_min"] is not None and cp["agreement_min"] >= stable), None)
        split_values = [1.0 - (1.0 - checkpoints[-1]["split_half_min"]) * rng.uniform(0.05, 1.0)
                        for _ in range(layers * heads - 1)] + [checkpoints[-1]["split_half_min"]]
        sampling.append(SamplingStability(dataset=spec, split_half=_summary(split_values, 0.95),
                                          checkpoints=checkpoints, tokens_to_stable=to_stable,
                                          stable_threshold=stable))

    # ---- perplexity on each evaluation corpus
    perplexity = []
    ref_gaps = []
    for index, spec in enumerate(evaluation):
        full = [17.84, 9.12, 24.3][index % 3]
        rows = [PolicyRow(policy="full", budget=None, window=None, perplexity=full, gap=0.0)]
        ratios: dict[str, float | None] = {}
        for b in BUDGETS:
            scale = (64 / b) ** 1.15
            gaps = {"streamingllm": 3.1 * scale * full / 17.84, "random": 9.5 * scale * full / 17.84}
            qf_share = 0.58 if passing else 0.97 + 0.05 * index
            gaps["qfilters"] = gaps["streamingllm"] * qf_share * rng.uniform(0.95, 1.05)
            gaps["knorm"] = gaps["streamingllm"] * (0.86 if passing else 0.93) * rng.uniform(0.95, 1.05)
            for policy in ("qfilters", "knorm", "streamingllm", "random"):
                rows.append(PolicyRow(policy=policy, budget=b, window=WINDOW, perplexity=_r(full + gaps[policy], 4),
                                      gap=_r(gaps[policy], 4)))
            ratios[str(b)] = _r(gaps["qfilters"] / gaps["streamingllm"], 4)
            if b == REFERENCE_BUDGET:
                ref_gaps.append((spec, gaps["qfilters"], gaps["streamingllm"], gaps["knorm"]))
        perplexity.append(PerplexityReport(dataset=_dataset(spec, rng, 8 * 256), seq_len=1024, score_last=256,
                                           documents_skipped=index, full_perplexity=full, rows=rows,
                                           gap_ratio_vs_streamingllm=ratios))

    # ---- transfer: rows = each calibration corpus + the combined filters
    rows_t = [*calibration, "combined"]
    t_ppl, t_ratio = [], []
    for i, _ in enumerate(rows_t):
        pr, rr = [], []
        for j, p in enumerate(perplexity):
            base = ref_gaps[j]
            own = 0.9 if i < k and calibration[i] == evaluation[j] else 1.0
            ratio = base[1] / base[2] * own * rng.uniform(0.93, 1.12 if passing else 1.35)
            if i == len(rows_t) - 1:
                ratio = base[1] / base[2]
            pr.append(_r(p.full_perplexity + base[2] * ratio, 4))
            rr.append(_r(ratio, 4))
        t_ppl.append(pr)
        t_ratio.append(rr)
    transfer = TransferMatrix(budget=REFERENCE_BUDGET, window=WINDOW, calibration=rows_t, evaluation=list(evaluation),
                              perplexity=t_ppl, gap_ratio_vs_streamingllm=t_ratio)

    # ---- architecture and its warnings
    warnings = []
    if not passing:
        warnings = [
            "This model normalizes its queries and keys (QK-norm). The Q-Filters paper reports that the method fails "
            "on QK-norm models (OLMo-2): expect little or no gain over simply keeping the most recent tokens "
            "(StreamingLLM).",
            f"{len(sliding_layers)} of {layers} layers use sliding-window attention of 512 tokens: their cache is "
            f"already bounded by the window and Q-Filters do not compress them. Only {len(compressed)} layers "
            f"({', '.join(map(str, compressed))}) are compressed, so the memory saved is limited to those layers.",
            "3 of 27 query heads in the compressed layers are nearly isotropic (largest singular value less than 1.5x "
            "the second): their queries have no dominant direction, so a single fixed filter ranks keys poorly there.",
        ]
    architecture = ArchitectureRisk(
        model_type="llama" if passing else "gemma3_text", num_layers=layers, num_attention_heads=heads * 3,
        num_kv_heads=heads, head_dim=64 if passing else 256, qk_norm=not passing, qkv_bias=False, rope=True,
        sliding_window=None if passing else 512, sliding_layers=sliding_layers, compressed_layers=compressed,
        sigma_ratio_median=3.41 if passing else 1.87, sigma_ratio_min=1.62 if passing else 1.08,
        positive_share_median=0.968 if passing else 0.81, warnings=warnings)

    # ---- gates and verdict
    cross = stability.summary.mean
    worst_ratio = max(qf / sl for _, qf, sl, _ in ref_gaps)
    worst_ratio_spec = max(ref_gaps, key=lambda g: g[1] / g[2])[0]
    worst_knorm = max(qf - kn for _, qf, _, kn in ref_gaps)
    worst_split = min((s.split_half.min, s.dataset) for s in sampling)
    gates = [
        _gate("cross_dataset_cosine", "Mean cosine, over every pair of calibration datasets and every (layer, KV "
              "head), between the filters calibrated on each dataset is at least {threshold}.", 0.9, cross, ">="),
        _gate("gap_ratio_vs_streamingllm", "At the reference budget, on every evaluation dataset, the perplexity gap "
              "of Q-Filters (vs. full cache) is at most {threshold} x the gap of StreamingLLM (value: the worst "
              "dataset).", 0.9, worst_ratio, "<="),
        _gate("gap_vs_knorm", "At the reference budget, on every evaluation dataset, gap(Q-Filters) - gap(K-norm) is "
              "below {threshold} (value: the worst dataset; negative means Q-Filters lose less perplexity than "
              "K-norm).", 0.0, worst_knorm, "<"),
        _gate("split_half_min", "Within every calibration dataset, the lowest cosine over (layer, KV head) between "
              "filters from two halves of the sample is at least {threshold}.", 0.95, worst_split[0], ">="),
    ]
    reasons = []
    if not gates[1].passed:
        reasons.append(f"Q-Filters do not beat the free StreamingLLM baseline by enough: at budget {REFERENCE_BUDGET} "
                       f"on {worst_ratio_spec} their perplexity gap is {worst_ratio:.3f} x StreamingLLM's "
                       "(required: at most 0.9).")
    if not gates[2].passed:
        reasons.append(f"Q-Filters do not beat K-norm: their perplexity gap exceeds K-norm's by {worst_knorm:.3f}.")
    if not gates[3].passed:
        reasons.append(f"The filters are not settled by the calibration sample: on {worst_split[1]} two halves of the "
                       f"sample give filters with cosine as low as {worst_split[0]:.3f} (required: at least 0.95); "
                       "calibrate on more tokens.")
    if not gates[0].passed:
        reasons.append(f"The filters depend on the calibration text: mean cross-dataset cosine is {cross:.3f}.")
    status = "pass" if all(g.passed for g in gates) else "fail"
    assert (status == "pass") == passing, "the synthetic numbers must produce the requested verdict"
    verdict = Verdict(status=status, reasons=reasons, warnings=warnings, gates=gates)

    settings = Settings(
        calibration=list(calibration), evaluation=list(evaluation), tokens_per_dataset=tokens, calib_seq_len=512,
        seed=0, eval_seq_len=1024, score_last=256, budgets=BUDGETS, window=WINDOW, n_sinks=4,
        reference_budget=REFERENCE_BUDGET, max_docs=8,
        gates={g.name: g.threshold for g in gates},
    )
    return ValidationReport(
        created_at="2025-06-01T12:00:00Z",
        qfilters_version="0.1.0",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct" if passing else "google/gemma-3-1b-it",
        model_revision="12fd25f77366fa6b3b4b768ec3050bf629380bac" if passing else None,
        model_source="embedded package" if passing else "hub",
        settings=settings,
        calibration_datasets=[_dataset(spec, rng, tokens) for spec in calibration],
        architecture=architecture,
        stability=stability,
        sampling=sampling,
        perplexity=perplexity,
        transfer=transfer,
        verdict=verdict,
        artifact_sha256=_sha(rng),
    )
