"""Calibration: stream calibration text through the model, capture post-RoPE queries, read off Q-Filters.

Queries are captured inside the attention-function interface (``qfilters.attention``), so any transformers 5 causal LM
works without patched modeling code, and what the model computes is unchanged. Only the base model runs: the LM head
and the logits are never computed. Statistics stream into fixed-size float64 accumulators (``QueryStatistics``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from qfilters.attention import AttentionFn, AttentionModule, attention_hook
from qfilters.errors import CalibrationError
from qfilters.models import LoadedModel
from qfilters.query_stats import Directions, QueryStatistics, cosine, group_mean

if TYPE_CHECKING:
    from qfilters.data import Corpus


@dataclass(frozen=True)
class CalibrationConfig:
    """How much text, in what shape. Defaults calibrate a small model on a laptop CPU in minutes."""

    max_tokens: int = 65_536
    seq_len: int = 2048
    batch_size: int = 4
    seed: int = 0
    checkpoint_every: int = 16_384  # tokens between convergence checkpoints
    until_stable: float | None = None  # stop once min cosine between checkpoints >= this (e.g. 0.999)

    def __post_init__(self) -> None:
        if self.max_tokens <= 0 or self.seq_len <= 0 or self.batch_size <= 0 or self.checkpoint_every <= 0:
            raise ValueError("max_tokens, seq_len, batch_size and checkpoint_every must be positive")
        if self.until_stable is not None and not 0.0 < self.until_stable < 1.0:
            raise ValueError(f"until_stable must be in (0, 1), e.g. 0.999; got {self.until_stable}")


@dataclass
class Checkpoint:
    tokens: int
    agreement_min: float | None  # min over (layer, kv head) of cos(previous checkpoint, now); None at the first
    agreement_mean: float | None
    split_half_min: float
    split_half_mean: float


@dataclass
class CalibrationProgress:
    tokens: int
    total_tokens: int
    tokens_per_s: float
    checkpoint: Checkpoint | None = None


@dataclass
class CalibrationResult:
    filters: Any  # qfilters.artifact.QFilters
    checkpoints: list[Checkpoint] = field(default_factory=list)
    stopped_early: bool = False
    tokens: int = 0
    seconds: float = 0.0
    statistics: QueryStatistics | None = None  # the raw accumulators, to merge runs exactly (see combine_results)


class _QueryCapture:
    """Attention hook that feeds queries into ``QueryStatistics`` and then runs the real kernel unchanged."""

    def __init__(self, stats: QueryStatistics) -> None:
        self.stats = stats
        self.token_mask: torch.Tensor | None = None  # [B, T] for the batch in flight
        self.half_of_row: torch.Tensor | None = None  # [B]
        self.layers_seen: set[int] = set()

    def __call__(self, module: AttentionModule, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, base_fn: AttentionFn,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = module.layer_idx
        self.layers_seen.add(layer)
        assert self.half_of_row is not None  # calibrate() sets it before each forward pass
        self.stats.add(layer, query.detach(), self.half_of_row, self.token_mask)
        return base_fn(module, query, key, value, attention_mask, **kwargs)


def _interleave(iterators: Sequence[Iterator[list[int]]]) -> Iterator[tuple[int, list[int]]]:
    """Round-robin over datasets so a mixture stays balanced at every token count (matters for --until-stable)."""
    active = list(enumerate(iterators))
    while active:
        still = []
        for idx, it in active:
            chunk = next(it, None)
            if chunk is not None:
                yield idx, chunk
                still.append((idx, it))
        active = still


def _batches(chunks: Iterable[tuple[int, list[int]]], batch_size: int) -> Iterator[list[tuple[int, list[int]]]]:
    it = iter(chunks)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch


def _summaries(kv_filters: torch.Tensor, stats: QueryStatistics, num_kv_heads: int) -> tuple[float, float]:
    halves = [group_mean(stats.directions(h).v1, num_kv_heads) for h in (0, 1)]
    split = cosine(*halves)
    return float(split.min()), float(split.mean())


def calibrate(
    lm: LoadedModel,
    corpora: Sequence[Any],
    config: CalibrationConfig = CalibrationConfig(),
    on_progress: Callable[[CalibrationProgress], None] | None = None,
) -> CalibrationResult:
    """Calibrate Q-Filters for ``lm`` on ``corpora`` (``qfilters.data.Corpus`` objects, mixed round-robin)."""
    from qfilters.artifact import QFilters
    from qfilters.data import iter_token_chunks

    if not corpora:
        raise CalibrationError("no calibration dataset given")
    info, model, tokenizer = lm.info, lm.model, lm.tokenizer
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    stats = QueryStatistics(info.num_layers, info.num_attention_heads, info.head_dim, device=device)
    capture = _QueryCapture(stats)
    per_dataset_budget = config.max_tokens // len(corpora)
    if per_dataset_budget < config.seq_len:
        raise CalibrationError(
            f"{config.max_tokens} tokens over {len(corpora)} datasets leaves {per_dataset_budget} per dataset, less "
            f"than one {config.seq_len}-token sequence: raise --tokens or lower --seq-len"
        )
    iterators = [iter_token_chunks(tokenizer, c, config.seq_len, per_dataset_budget) for c in corpora]
    tokens_per_dataset = [0] * len(corpora)
    docs = [len(c.documents) for c in corpora]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = model.base_model  # transformer stack without the LM head: calibration never needs logits

    checkpoints: list[Checkpoint] = []
    previous: torch.Tensor | None = None
    next_checkpoint = config.checkpoint_every
    stopped_early, sequences, start = False, 0, time.perf_counter()

    def checkpoint() -> Checkpoint:
        nonlocal previous
        current = group_mean(stats.directions().v1, info.num_kv_heads)
        agree = cosine(previous, current) if previous is not None else None
        split_min, split_mean = _summaries(current, stats, info.num_kv_heads)
        cp = Checkpoint(
            tokens=stats.tokens,
            agreement_min=None if agree is None else float(agree.min()),
            agreement_mean=None if agree is None else float(agree.mean()),
            split_half_min=split_min,
            split_half_mean=split_mean,
        )
        previous = current
        stats.refresh_probe()
        checkpoints.append(cp)
        return cp

    with torch.inference_mode(), attention_hook(model, capture):
        for batch in _batches(_interleave(iterators), config.batch_size):
            longest = max(len(ids) for _, ids in batch)
            input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            token_mask = torch.zeros((len(batch), longest), dtype=torch.bool)
            for row, (ds, ids) in enumerate(batch):  # right padding; padded positions never reach the statistics
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                token_mask[row, : len(ids)] = True
                tokens_per_dataset[ds] += len(ids)
            capture.token_mask = token_mask.to(device)
            capture.half_of_row = (torch.arange(sequences, sequences + len(batch)) % 2).to(device)
            sequences += len(batch)
            base(input_ids=input_ids.to(device), attention_mask=token_mask.long().to(device), use_cache=False)
            if not stats.probing:  # positive projections are measured from the second batch on
                stats.refresh_probe()
            if len(capture.layers_seen) != info.num_layers:
                raise CalibrationError(
                    f"queries were captured for {len(capture.layers_seen)} of {info.num_layers} layers: this model's "
                    "attention does not go through transformers' attention-function interface"
                )
            cp = None
            if stats.tokens >= next_checkpoint:
                next_checkpoint = (stats.tokens // config.checkpoint_every + 1) * config.checkpoint_every
                cp = checkpoint()
            if on_progress is not None:
                elapsed = time.perf_counter() - start
                on_progress(CalibrationProgress(stats.tokens, config.max_tokens, stats.tokens / max(elapsed, 1e-9), cp))
            if (
                config.until_stable is not None
                and cp is not None
                and cp.agreement_min is not None
                and cp.agreement_min >= config.until_stable
            ):
                stopped_early = True
                break

    if stats.tokens == 0:
        raise CalibrationError("no calibration tokens reached the model: the datasets are empty after tokenization")
    if not checkpoints or checkpoints[-1].tokens != stats.tokens:
        checkpoint()
    seconds = time.perf_counter() - start
    directions = stats.directions()
    provenance = _provenance(lm, corpora, config, stats, directions, checkpoints, tokens_per_dataset, docs,
                             sequences, stopped_early)
    filters = QFilters.from_query_filters(directions.v1.to(torch.float32).cpu(), info.num_kv_heads, provenance)
    return CalibrationResult(filters, checkpoints, stopped_early, stats.tokens, seconds, stats)


def combine_results(lm: LoadedModel, results: Sequence[CalibrationResult]) -> Any:
    """Filters calibrated on the union of several runs' data, with no extra forward pass.

    Exact, because the statistics are sums: the merged second moments are those a single run over all the tokens
    would have accumulated. Used by validation to publish one filter set from its per-dataset runs.
    """
    from qfilters.artifact import QFilters

    if not results or any(r.statistics is None for r in results):
        raise CalibrationError("combine_results needs calibration results that carry their statistics")
    stats = QueryStatistics.merged([r.statistics for r in results if r.statistics is not None])  # all, checked above
    directions = stats.directions()
    provenances = [r.filters.provenance for r in results]
    calibration = dict(provenances[0]["calibration"])
    calibration.update(
        datasets=[d for p in provenances for d in p["calibration"]["datasets"]],
        tokens=stats.tokens,
        sequences=sum(p["calibration"]["sequences"] for p in provenances),
        max_tokens=sum(p["calibration"]["max_tokens"] for p in provenances),
        stopped_early=any(p["calibration"]["stopped_early"] for p in provenances),
        checkpoints=[],
        combined_from=len(results),
    )
    provenance = {
        **provenances[0],
        "calibration": calibration,
        "statistics": _statistics(stats, directions, lm.info.num_kv_heads),
    }
    return QFilters.from_query_filters(directions.v1.to(torch.float32).cpu(), lm.info.num_kv_heads, provenance)


def _rounded(t: torch.Tensor | None, digits: int = 6) -> list | None:
    """Nested lists with fixed rounding: readable JSON that is byte-identical across identical runs."""
    return None if t is None else [[round(float(x), digits) for x in row] for row in t.cpu()]


def _provenance(lm: LoadedModel, corpora: Sequence[Corpus], config: CalibrationConfig, stats: QueryStatistics,
                directions: Directions, checkpoints: list[Checkpoint], tokens_per_dataset: list[int], docs: list[int],
                sequences: int, stopped_early: bool) -> dict[str, Any]:
    import transformers

    import qfilters

    info = lm.info
    return {
        "library_version": qfilters.__version__,
        "base_model": info.to_dict(),
        "calibration": {
            "datasets": [
                {"spec": c.spec, "sha256": c.sha256, "source": c.source, "documents": n_docs, "tokens": n_tok}
                for c, n_docs, n_tok in zip(corpora, docs, tokens_per_dataset, strict=True)
            ],
            "tokens": stats.tokens,
            "sequences": sequences,
            "seq_len": config.seq_len,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "max_tokens": config.max_tokens,
            "until_stable": config.until_stable,
            "stopped_early": stopped_early,
            "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
            # the kernel, not our routing (a per-head QFiltersCache leaves the model on qfilters+sdpa)
            "attn_implementation": str(lm.model.config._attn_implementation).removeprefix("qfilters+"),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "checkpoints": [asdict(cp) for cp in checkpoints],
        },
        "statistics": _statistics(stats, directions, info.num_kv_heads),
    }


def _statistics(stats: QueryStatistics, directions: Directions, num_kv_heads: int) -> dict[str, Any]:
    """Per-head statistics recorded in provenance: sampling noise, anisotropy, GQA agreement."""
    halves = [group_mean(stats.directions(h).v1, num_kv_heads) for h in (0, 1)]
    kv_now = group_mean(directions.v1, num_kv_heads)
    return {
        "split_half_cosine": _rounded(cosine(*halves)),  # [L][H_kv]
        "sigma_ratio": _rounded(directions.sigma_ratio),  # [L][H_q]
        "positive_share": _rounded(stats.positive_share()),  # [L][H_q]
        "group_coherence": _rounded(kv_now.norm(dim=-1)),  # [L][H_kv] norm of the GQA mean (1 = heads agree)
    }


# ------------------------------------------------------------------------------------------ durable per-dataset runs

_RESULT_FORMAT = 1
_STAT_TENSORS = ("second_moment", "query_sum", "count", "_positive", "_probed")


def dump_result(result: CalibrationResult) -> bytes:
    """A calibration result as safetensors bytes (no pickle), so another process or host can validate over it.

    Holds the filters, their provenance, the checkpoints and the raw statistics that :func:`combine_results` merges.
    """
    import json

    import safetensors.torch

    if result.statistics is None:
        raise CalibrationError("only results that carry their statistics can be stored (see combine_results)")
    stats = result.statistics
    tensors = {f"stats.{name}": getattr(stats, name).detach().cpu().contiguous() for name in _STAT_TENSORS}
    if stats._probe is not None:
        tensors["stats._probe"] = stats._probe.detach().cpu().contiguous()
    tensors["filters"] = result.filters.filters.detach().cpu().contiguous()
    meta = {"format": _RESULT_FORMAT, "provenance": result.filters.provenance,
            "checkpoints": [asdict(cp) for cp in result.checkpoints], "stopped_early": result.stopped_early,
            "tokens": result.tokens, "seconds": result.seconds}
    return safetensors.torch.save(tensors, metadata={"qfilters_calibration": json.dumps(meta)})


def load_result(data: bytes, device: torch.device | str = "cpu") -> CalibrationResult:
    """Inverse of :func:`dump_result`; statistics land on ``device`` (where the model that merges them lives)."""
    import json

    import safetensors.torch

    from qfilters.artifact import QFilters

    try:
        tensors = safetensors.torch.load(data)
        header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then the JSON header
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["qfilters_calibration"])
    except Exception as e:
        raise CalibrationError(f"stored calibration result cannot be read ({type(e).__name__}: {e})") from e
    if meta.get("format") != _RESULT_FORMAT:
        raise CalibrationError(f"stored calibration result has format {meta.get('format')}, expected {_RESULT_FORMAT}")
    moment = tensors["stats.second_moment"]
    stats = QueryStatistics(moment.shape[1], moment.shape[2], moment.shape[-1], device=device)
    for name in _STAT_TENSORS:
        setattr(stats, name, tensors[f"stats.{name}"].to(device))
    if "stats._probe" in tensors:
        stats._probe = tensors["stats._probe"].to(device)
    filters = QFilters(tensors["filters"], meta["provenance"])
    checkpoints = [Checkpoint(**cp) for cp in meta["checkpoints"]]
    return CalibrationResult(filters, checkpoints, meta["stopped_early"], meta["tokens"], meta["seconds"], stats)
