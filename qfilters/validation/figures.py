"""The validation report's figures, as PNG bytes: matplotlib on a private Agg canvas, deterministic byte for byte.

Every figure is drawn at a fixed size and dpi under matplotlib's default style (whatever the caller's rcParams say),
with math-text parsing off (dataset specs are user text and may contain ``$``) and without PNG metadata, so the same
report always gives the same bytes. Nothing here touches the global backend.

Cosines are shown on a "nines" scale (-log10(1 - cosine)): 0.9, 0.99 and 0.999 are equally spaced, so differences
between filters that all agree to better than 0.9 stay visible.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from qfilters.policy_table import policy_color, policy_label, policy_order
from qfilters.validation.schema import (
    PasskeyReport,
    PerplexityReport,
    SamplingStability,
    StabilityReport,
    TransferMatrix,
)

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

DPI = 150  # pixels per inch of the PNGs; pages show them at 96 CSS px per inch (sharp on high-density screens)
CSS_DPI = 96
PAGE_WIDTH_IN = 10.5

BELOW = "#e0001b"  # outline of heads under the threshold
NINES_FLOOR = 1e-4  # 1 - cosine below this is drawn as 0.9999 (the top of the scale)
PRIMARY_TICKS = (0.9999, 0.999, 0.99, 0.9)  # one unit apart on the nines scale
SECONDARY_TICKS = (0.5, 0.0, -1.0, 0.95, 0.995, 0.8, -0.5)
TICK_GAP = 0.085  # least distance between two cosine ticks, as a share of the scale

_RC: dict[RcKeyType, bool | str | float] = {
    "text.parse_math": False,
    "svg.hashsalt": "qfilters",
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "legend.fontsize": 8.5,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
}


@dataclass(frozen=True)
class Png:
    """A rendered figure: PNG bytes and the size to show it at, in CSS pixels."""

    data: bytes
    width: int
    height: int


# ----------------------------------------------------------------------------------------------------- plumbing
@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs in user text, tight layout hints: never fatal
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_RC)
        yield


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> Png:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    w, h = fig.get_size_inches()
    return Png(buf.getvalue(), round(w * CSS_DPI), round(h * CSS_DPI))


def short_label(text: str, limit: int = 26) -> str:
    """One line, at most ``limit`` characters (middle elided); never hidden by matplotlib's leading-underscore rule."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        keep = limit - 1
        text = text[: (keep + 1) // 2] + "\u2026" + text[len(text) - keep // 2:]
    return " " + text if text.startswith("_") else text


def _finite(x: float | None) -> TypeGuard[float]:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------- cosine scale
def nines(x: Any) -> Any:
    """-log10(1 - cosine), clipped at 0.9999: the colour/axis coordinate of a cosine."""
    return -np.log10(np.maximum(1.0 - np.asarray(x, dtype=float), NINES_FLOOR))


def _nines_inverse(y: Any) -> Any:
    return 1.0 - np.power(10.0, -np.asarray(y, dtype=float))


def cosine_range(values: Sequence[float]) -> tuple[float, float]:
    """Colour range of a cosine map: at least [0.8, 0.9999], widened down to the lowest value shown."""
    finite = [v for v in values if _finite(v)]
    low = min([0.8, *finite])
    return max(-1.0, math.floor(low * 20) / 20), 1.0 - NINES_FLOOR


def _cosine_norm(low: float, high: float) -> Any:
    from matplotlib.colors import FuncNorm

    return FuncNorm((nines, _nines_inverse), vmin=low, vmax=high)


def _cosine_ticks(low: float, high: float = 1.0 - NINES_FLOOR, length_in: float | None = None) -> list[float]:
    """Cosine ticks that do not crowd on the nines scale: the nines first, then others where there is room
    (``length_in``: the axis length in inches, to keep labels at least ~0.3 in apart)."""
    span = float(nines(high) - nines(low)) or 1.0
    gap = max(TICK_GAP, 0.3 / length_in) if length_in else TICK_GAP
    chosen: list[float] = []
    for t in (*PRIMARY_TICKS, *SECONDARY_TICKS, low):
        if not low - 1e-9 <= t <= high + 1e-9:
            continue
        if all(abs(float(nines(t) - nines(c))) >= gap * span for c in chosen):
            chosen.append(t)
    return sorted(chosen)


def _fmt_tick(t: float) -> str:
    return f"{t:.4f}".rstrip("0").rstrip(".") if t != 0 else "0"


def _cosine_colorbar(fig: Any, mappable: Any, ax: Any, low: float, label: str, length_in: float, **kw: Any) -> None:
    bar = fig.colorbar(mappable, ax=ax, **kw)
    ticks = _cosine_ticks(low, float(mappable.norm.vmax), length_in)
    bar.set_ticks(ticks, labels=[_fmt_tick(t) for t in ticks])
    bar.minorticks_off()
    bar.set_label(label)


def _text_color(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _cosine_axis(ax: Any, axis: str, low: float) -> None:
    """Put one axis of ``ax`` on the nines scale, with cosine ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = _cosine_ticks(low, length_in=2.6)
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    setter("function", functions=(nines, _nines_inverse))
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda t, _pos: _fmt_tick(t)))
    target.set_minor_locator(NullLocator())
    (ax.set_ylim if axis == "y" else ax.set_xlim)(low, 1.0 - NINES_FLOOR)


# ---------------------------------------------------------------------------------------------------- figures
def cosine_matrices(stability: StabilityReport) -> Png:
    """K x K mean and min cross-dataset cosine, side by side, annotated, shared nines colour scale."""
    k = len(stability.datasets)
    labels = [short_label(d, 22) for d in stability.datasets]
    values = [v for m in (stability.mean_cosine, stability.min_cosine) for i, row in enumerate(m)
              for j, v in enumerate(row) if i != j]
    low, high = cosine_range(values)
    side = min(6.0, max(3.0, 0.9 + 0.55 * k))
    with _style():
        from matplotlib import colormaps

        cmap = colormaps["viridis"].with_extremes(bad="#ececec")
        norm = _cosine_norm(low, high)
        fig = _figure(PAGE_WIDTH_IN, side + 1.3)
        axes = fig.subplots(1, 2)
        annotate = k <= 12
        font = 8.5 if k <= 6 else (7 if k <= 9 else 5.5)
        image = None
        for ax, matrix, title in zip(axes, (stability.mean_cosine, stability.min_cosine),
                                     ("mean over (layer, KV head)", "lowest (layer, KV head)"), strict=True):
            data = np.ma.masked_invalid(np.array(
                [[float("nan") if (i == j or not _finite(v)) else float(v) for j, v in enumerate(row)]
                 for i, row in enumerate(matrix)], dtype=float))
            image = ax.imshow(data, cmap=cmap, norm=norm, aspect="equal")
            ax.set_xticks(range(k), labels, rotation=35, ha="right", rotation_mode="anchor")
            ax.set_yticks(range(k), labels)
            ax.set_title(f"Cosine between filters: {title}")
            ax.tick_params(length=0)
            for s in ax.spines.values():
                s.set_visible(False)
            if annotate:
                for i, row in enumerate(matrix):
                    for j, v in enumerate(row):
                        if i == j:
                            ax.text(j, i, "same", ha="center", va="center", in_layout=False, fontsize=font - 1,
                                    color="#888888")
                        elif _finite(v):
                            ax.text(j, i, f"{v:.4f}", ha="center", va="center", in_layout=False, fontsize=font,
                                    color=_text_color(cmap(norm(v))))
        _cosine_colorbar(fig, image, list(axes), low, "cosine (nines scale)", 0.8 * side, shrink=0.85, pad=0.02)
        return _png(fig)


def head_heatmap(stability: StabilityReport, threshold: float, sliding_layers: Sequence[int] = ()) -> Png:
    """[layer x KV head] lowest cross-dataset cosine; heads below ``threshold`` outlined in red."""
    grid = [[float(v) if _finite(v) else float("nan") for v in row] for row in stability.per_head_min]
    layers = len(grid)
    heads = max((len(r) for r in grid), default=0)
    data = np.ma.masked_invalid(np.array([r + [float("nan")] * (heads - len(r)) for r in grid], dtype=float).T)
    low, high = cosine_range([v for r in grid for v in r])
    height = min(9.0, 1.9 + 0.42 * heads)
    sliding = set(sliding_layers)
    with _style():
        from matplotlib import colormaps
        from matplotlib.patches import Rectangle

        cmap = colormaps["viridis"].with_extremes(bad="#ececec")
        norm = _cosine_norm(low, high)
        fig = _figure(PAGE_WIDTH_IN, height)
        ax = fig.subplots()
        image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        step = 1 if layers <= 40 else (2 if layers <= 80 else 4)
        ax.set_xticks(range(0, layers, step), [str(i) for i in range(0, layers, step)])
        for tick, layer in zip(ax.get_xticklabels(), range(0, layers, step), strict=True):
            if layer in sliding:
                tick.set_color("#999999")
        hstep = 1 if heads <= 16 else 2
        ax.set_yticks(range(0, heads, hstep), [str(h) for h in range(0, heads, hstep)])
        ax.set_xlabel("layer" + (" (grey numbers: sliding-window layers, not compressed)" if sliding else ""))
        ax.set_ylabel("KV head")
        ax.tick_params(length=0)
        ax.set_title(f"Lowest cosine over all pairs of calibration datasets, per (layer, KV head); "
                     f"red box: below {threshold:g}")
        annotate = layers <= 40 and heads <= 12
        for h in range(heads):
            for layer in range(layers):
                v = data[h, layer]
                if np.ma.is_masked(v):
                    continue
                v = float(v)
                if annotate:
                    text = f"{v:.3f}"
                    text = text.replace("0.", ".", 1) if text.startswith("0.") else text
                    ax.text(layer, h, text, ha="center", va="center", in_layout=False,
                            fontsize=7 if layers <= 32 else 6, color=_text_color(cmap(norm(v))))
                if v < threshold:
                    ax.add_patch(Rectangle((layer - 0.5, h - 0.5), 1, 1, fill=False, edgecolor=BELOW,
                                           linewidth=2.2))
        _cosine_colorbar(fig, image, ax, low, "cosine (nines scale)", height - 0.9, pad=0.01, fraction=0.04)
        return _png(fig)


def layer_curves(stability: StabilityReport, threshold: float, sliding_layers: Sequence[int] = ()) -> Png:
    """Per layer: mean cosine (over pairs and heads) and the lowest head's cosine, with the threshold."""
    mean = [float(v) if _finite(v) else float("nan") for v in stability.per_layer_mean]
    low_per_layer = [min((float(v) for v in row if _finite(v)), default=float("nan"))
                     for row in stability.per_head_min]
    layers = list(range(max(len(mean), len(low_per_layer))))
    low, _ = cosine_range(mean + low_per_layer + [threshold])
    with _style():
        fig = _figure(PAGE_WIDTH_IN, 3.9)
        ax = fig.subplots()
        for layer in sliding_layers:
            ax.axvspan(layer - 0.5, layer + 0.5, color="#eeeeee", zorder=0, linewidth=0)
        ax.plot(layers[: len(mean)], mean, marker="o", markersize=3.5, color="#1f77b4",
                label="mean over dataset pairs and KV heads")
        ax.plot(layers[: len(low_per_layer)], low_per_layer, marker="v", markersize=4, color="#d62728",
                label="lowest (layer, KV head) over dataset pairs")
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        _cosine_axis(ax, "y", low)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        step = 1 if len(layers) <= 40 else (2 if len(layers) <= 80 else 4)
        ax.set_xticks(range(0, len(layers), step))
        ax.set_xlabel("layer" + (" (grey bands: sliding-window layers, not compressed)" if sliding_layers else ""))
        ax.set_ylabel("cross-dataset cosine")
        ax.set_title("Cross-dataset agreement of the filters, layer by layer")
        ax.grid(True, alpha=0.3)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
        return _png(fig)


def sampling_curves(sampling: Sequence[SamplingStability], split_half_threshold: float | None) -> Png | None:
    """Per calibration dataset over the calibration tokens: agreement with the previous checkpoint and split-half."""
    series = []
    for s in sampling:
        points = [cp for cp in s.checkpoints if isinstance(cp, dict) and _finite(cp.get("tokens"))]
        if points:
            series.append((s, points))
    if not series:
        return None
    values: list[float] = []
    for s, points in series:
        values += [float(cp[k]) for cp in points for k in ("agreement_min", "split_half_min") if _finite(cp.get(k))]
        values.append(float(s.stable_threshold))
    if split_half_threshold is not None:
        values.append(float(split_half_threshold))
    low, _ = cosine_range(values)
    with _style():
        from matplotlib import colormaps

        palette = colormaps["tab10"]
        fig = _figure(PAGE_WIDTH_IN, 4.2 + 0.2 * ((len(series) + 2) // 4))
        left, right = fig.subplots(1, 2, sharey=True)
        for index, (s, points) in enumerate(series):
            color = palette(index % 10)
            label = short_label(s.dataset, 30)
            agree = [(cp["tokens"], float(cp["agreement_min"])) for cp in points if _finite(cp.get("agreement_min"))]
            split = [(cp["tokens"], float(cp["split_half_min"])) for cp in points if _finite(cp.get("split_half_min"))]
            if agree:
                left.plot(*zip(*agree, strict=True), marker="o", markersize=3.5, color=color, label=label)
            if split:
                right.plot(*zip(*split, strict=True), marker="o", markersize=3.5, color=color, label=label)
        thresholds = sorted({float(s.stable_threshold) for s, _ in series})
        for t in thresholds:
            left.axhline(t, color="black", linestyle="--", linewidth=1, label=f"stable at {t:g}")
        if split_half_threshold is not None:
            right.axhline(split_half_threshold, color="black", linestyle="--", linewidth=1,
                          label=f"gate {split_half_threshold:g}")
        for ax in (left, right):
            _cosine_axis(ax, "y", low)
            ax.set_xlabel("calibration tokens")
            ax.grid(True, alpha=0.3)
            ax.ticklabel_format(axis="x", style="plain")
            ax.xaxis.set_major_formatter(_thousands())
        left.set_ylabel("cosine, lowest (layer, KV head)")
        left.set_title("Agreement with the previous checkpoint")
        right.set_title("Split-half: filters from two halves of the sample")
        handles, labels = left.get_legend_handles_labels()
        extra = [(h, lab) for h, lab in zip(*right.get_legend_handles_labels(), strict=True) if lab.startswith("gate ")]
        handles += [h for h, _ in extra]
        labels += [lab for _, lab in extra]
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
        return _png(fig)


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    def fmt(x: float, _pos: int) -> str:
        if abs(x) >= 1_000_000:
            return f"{x / 1_000_000:g}M"
        if abs(x) >= 1000:
            return f"{x / 1000:g}k"
        return f"{x:g}"

    return FuncFormatter(fmt)


def perplexity_plot(ppl: PerplexityReport, reference_budget: int | None = None) -> Png:
    """Perplexity vs KV budget (log x) per policy of a report; the full cache as a dashed horizontal line."""
    rows = [r for r in ppl.rows if r.policy != "full" and r.budget is not None and _finite(r.perplexity)]
    series = {p: sorted((int(r.budget), float(r.perplexity)) for r in rows if r.policy == p)  # type: ignore[arg-type]
              for p in policy_order(r.policy for r in rows)}
    return budget_plot(series, float(ppl.full_perplexity) if _finite(ppl.full_perplexity) else None,
                       title=f"Perplexity vs KV budget on {short_label(ppl.dataset.spec, 40)}",
                       reference_budget=reference_budget)


def budget_plot(series: dict[str, list[tuple[int, float]]], full: float | None, *, title: str,
                xlabel: str = "KV budget per head (tokens kept, log scale)", ylabel: str = "perplexity",
                reference_budget: int | None = None, higher_is_better: bool = False,
                full_label: str | None = None) -> Png:
    """The one metric-vs-budget figure (perplexity in reports and ``qfilters eval --plot``, passkey accuracy): a line
    per policy over the budgets (log x, colours and order from the policy table), the full cache as a dashed line."""
    budgets = sorted({b for points in series.values() for b, _ in points})
    values = [v for points in series.values() for _, v in points] + ([full] if full is not None else [])
    positive = [v for v in values if v > 0]
    log_y = (not higher_is_better and bool(positive) and len(positive) == len(values)
             and max(positive) / min(positive) > 4)
    with _style():
        fig = _figure(8.0, 4.4)
        ax = fig.subplots()
        for policy in policy_order(series):
            ax.plot(*zip(*series[policy], strict=True), marker="o", markersize=4.5, linewidth=1.8,
                    color=policy_color(policy), label=policy_label(policy))
        if full is not None:
            ax.axhline(full, linestyle="--", color="black", linewidth=1.2,
                       label=full_label or f"full cache ({full:.2f})")
        if reference_budget is not None and reference_budget in budgets:
            ax.axvline(reference_budget, linestyle=":", color="#555555", linewidth=1,
                       label=f"reference budget {reference_budget}")
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
        if log_y:
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_locator(LogLocator(subs="auto"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + (" (log scale)" if log_y else "")
                      + ("  (higher is better)" if higher_is_better else "  (lower is better)"))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        return _png(fig)


def passkey_plot(pk: PasskeyReport) -> Png:
    """Passkey accuracy vs KV budget per policy; the full cache's as a dashed horizontal line."""
    series: dict[str, list[tuple[int, float]]] = {}
    full = None
    for c in pk.rows:
        if c.budget is None:
            full = 100.0 * c.correct / pk.trials
        else:
            series.setdefault(c.policy, []).append((c.budget, 100.0 * c.correct / pk.trials))
    series = {p: sorted(points) for p, points in series.items()}
    return budget_plot(series, full, title=f"Passkey retrieval vs KV budget ({pk.trials} needles, "
                                           f"{pk.context_tokens}-token {short_label(pk.filler, 30)} contexts)",
                       ylabel="keys retrieved (%)", higher_is_better=True,
                       full_label=None if full is None else f"full cache ({full:.0f}%)")


def transfer_heatmap(transfer: TransferMatrix) -> Png:
    """Calibrated on row i, evaluated on column j: colour = gap ratio vs StreamingLLM (below 1: Q-Filters better)."""
    rows, cols = len(transfer.calibration), len(transfer.evaluation)
    ratio = np.ma.masked_invalid(np.array(
        [[float(v) if _finite(v) else float("nan") for v in row] for row in transfer.gap_ratio_vs_streamingllm],
        dtype=float).reshape(rows, cols))
    vmin, vmax = 0.0, 2.0  # fixed, centred on 1 (as good as StreamingLLM); values outside take the end colours
    width = min(PAGE_WIDTH_IN, max(6.2, 3.6 + 1.7 * cols))
    height = min(9.0, 2.0 + 0.55 * rows)
    with _style():
        from matplotlib import colormaps
        from matplotlib.colors import TwoSlopeNorm

        cmap = colormaps["RdYlGn_r"].with_extremes(bad="#ececec")
        norm = TwoSlopeNorm(vcenter=1.0, vmin=vmin, vmax=vmax)
        fig = _figure(width, height)
        ax = fig.subplots()
        image = ax.imshow(ratio, cmap=cmap, norm=norm, aspect="auto")
        ax.set_xticks(range(cols), [short_label(c, 24) for c in transfer.evaluation])
        ax.set_yticks(range(rows), [short_label(r, 24) for r in transfer.calibration])
        ax.xaxis.set_ticks_position("top")
        ax.xaxis.set_label_position("top")
        ax.set_ylabel("filters calibrated on")
        ax.tick_params(length=0)
        if rows > 1:
            ax.axhline(rows - 1.5, color="white", linewidth=3)
        for i in range(rows):
            for j in range(cols):
                r = transfer.gap_ratio_vs_streamingllm[i][j] if j < len(transfer.gap_ratio_vs_streamingllm[i]) else None
                p = transfer.perplexity[i][j] if j < len(transfer.perplexity[i]) else None
                head = f"{r:.2f}x" if _finite(r) else ("undefined" if r is None else "n/a")
                tail = f"ppl {p:.2f}" if _finite(p) else ""
                color = _text_color(cmap(norm(r))) if _finite(r) else "#555555"
                ax.text(j, i, f"{head}\n{tail}".strip(), ha="center", va="center", in_layout=False, fontsize=8,
                        color=color)
        ax.set_title(f"Evaluated on (budget {transfer.budget}); cell: gap ratio vs StreamingLLM and perplexity",
                     fontsize=9)
        bar = fig.colorbar(image, ax=ax, pad=0.02, fraction=0.06, extend="both")
        bar.set_label("gap ratio vs StreamingLLM (lower is better)")
        return _png(fig)

