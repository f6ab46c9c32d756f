"""Passkey retrieval under KV compression (kvpress protocol): does the compressed cache still hold a hidden key?

A five-digit key is hidden at a random depth of filler text (Austen). The context is prefilled with full attention,
compressed ONCE to a per-layer budget (every policy sees the same full-attention keys, as a kvpress press does), then
the question and the answer are appended and attend to the compressed context plus themselves. A trial counts when
teacher-forced argmax over the key's tokens reproduces all of them (what greedy decoding would emit, without the
sampling loop).

One prefill per trial serves every policy and budget: the cache is filled once, each policy only changes which
context keys the question's queries may see (a per-head mask), and the cache is cut back to the context after each.
Policies: ``full``; any static :class:`~qfilters.scorers.Scorer` (window + sinks + best by score, i.e. what greedy
eviction holds when the context ends); per-layer recipes (:mod:`qfilters.recipes`); and ``snapkv``, which scores
context keys by the real attention of the context's last queries: it NEEDS ATTENTION WEIGHTS (no FlashAttention
path), and is a reference for how far the static scorers are from it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qfilters.architecture import compressed_layers
from qfilters.attention import AttentionFn, AttentionModule, attention_hook
from qfilters.policy import EvictionPolicy, LayerwisePolicy

__all__ = ["PasskeyRun", "PasskeyTrial", "SnapKV", "make_trials", "run_passkey", "standard_policies"]

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
MIN_FILLER = 16  # tokens of filler a context needs around its needle


@dataclass
class PasskeyTrial:
    context: list[int]  # BOS + intro + filler with the needle inside
    question: list[int]
    answer: list[int]  # the key's tokens
    key: str
    depth: float  # needle start / context length
    needle: tuple[int, int] = (0, 0)  # [start, end) of the needle's tokens in ``context``


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_trials(tokenizer: Any, filler: str, n_trials: int, context_tokens: int, seed: int = 0) -> list[PasskeyTrial]:
    """``n_trials`` seeded trials of about ``context_tokens`` context tokens (keys, depths and filler offsets drawn)."""
    if n_trials <= 0 or context_tokens < 64:
        raise ValueError("need n_trials >= 1 and context_tokens >= 64")
    rng = random.Random(seed)
    bos = getattr(tokenizer, "bos_token_id", None)
    head = ([bos] if bos is not None else []) + _encode(tokenizer, INTRO)
    question = _encode(tokenizer, QUESTION)
    trials = []
    for _ in range(n_trials):
        key = str(rng.randint(10000, 99999))
        needle = _encode(tokenizer, NEEDLE.format(key=key))
        n_filler = context_tokens - len(head) - len(needle)
        if n_filler < MIN_FILLER:
            raise ValueError(f"{context_tokens}-token passkey contexts leave {n_filler} filler tokens beside the intro "
                             f"({len(head)} tokens) and the needle ({len(needle)}): use at least "
                             f"{len(head) + len(needle) + MIN_FILLER} tokens")
        start = rng.randrange(0, max(1, len(filler) - 8 * n_filler))
        text = filler[start:start + 8 * n_filler + 64]
        ids = _encode(tokenizer, text)[:n_filler]
        if len(ids) < n_filler:
            raise ValueError(f"filler text too short for {context_tokens}-token contexts")
        depth = rng.random()
        cut = round(depth * n_filler)
        context = head + ids[:cut] + needle + ids[cut:]
        # " 12345" may tokenize as a space token then digits: the space joins the question, the digits are scored
        answer = _encode(tokenizer, " " + key)
        first = next(i for i, t in enumerate(answer) if any(c.isdigit() for c in tokenizer.decode([t])))
        start = len(head) + cut
        trials.append(PasskeyTrial(context, question + answer[:first], answer[first:], key, start / len(context),
                                   (start, start + len(needle))))
    return trials


@dataclass(frozen=True)
class SnapKV:
    """Attention-based reference: score = attention of the last ``observe`` context queries (mean over them and the
    GQA group, avg-pooled over ``pool`` neighbours); keeps those ``observe`` recent keys. Needs attention weights."""

    budget: int
    observe: int = 32
    pool: int = 7
    name = "snapkv"


@dataclass
class PasskeyRun:
    """Per policy label: correct trials (one bool per trial), plus the trials' depths."""

    hits: dict[str, list[bool]] = field(default_factory=dict)
    logprob: dict[str, list[float]] = field(default_factory=dict)  # log p(key tokens | ...), teacher-forced
    depths: list[float] = field(default_factory=list)

    def accuracy(self, label: str) -> float:
        h = self.hits[label]
        return sum(h) / len(h)

    def to_dict(self) -> dict[str, Any]:
        return {"trials": len(self.depths), "depths": [round(d, 4) for d in self.depths],
                "accuracy": {k: self.accuracy(k) for k in self.hits},
                "correct": {k: sum(v) for k, v in self.hits.items()},
                "mean_logprob": {k: sum(v) / len(v) for k, v in self.logprob.items()}}


class _Prefill:
    """Hook for the context prefill: full attention, remembering each layer's last queries (for SnapKV)."""

    def __init__(self, observe: int) -> None:
        self.observe = observe
        self.queries: dict[int, Tensor] = {}  # layer -> its last ``observe`` queries [B, Hq, observe, D]
        self.scaling: dict[int, float] = {}

    def __call__(self, module: AttentionModule, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, base_fn: AttentionFn, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        self.queries[module.layer_idx] = query[:, :, -self.observe:].detach()
        self.scaling[module.layer_idx] = float(getattr(module, "scaling", query.shape[-1] ** -0.5))
        return base_fn(module, query, key, value, attention_mask, **kwargs)


def _keep_static(policy: EvictionPolicy, keys: Tensor, layer: int) -> Tensor:
    """bool [B, H, T]: what greedy eviction holds when the context ends (window + sinks + best by score)."""
    length = keys.shape[2]
    positions = torch.arange(length, device=keys.device)
    keep = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    if length <= policy.min_budget:
        return keep
    scores = policy.scores(keys, layer, positions)
    for head, (budget, window) in enumerate(policy.head_limits(keys.shape[1])):  # each KV head keeps its own count
        if length <= budget:
            continue
        n_old = length - window
        order = torch.sort(scores[:, head, :n_old], dim=-1, descending=True, stable=True).indices
        keep[:, head, :n_old] = False
        keep[:, head].scatter_(-1, order[..., :budget - window], True)
    return keep


def attention_weights(queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
    """Causal softmax attention [B, H_q, n, T] (float32) of the last ``n`` positions' ``queries`` [B, H_q, n, D] over
    ``keys`` [B, H_kv, T, D] (GQA: each KV head serves H_q / H_kv query heads): what SDPA computes but never returns."""
    n, length = queries.shape[2], keys.shape[2]
    k = keys.float().repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # [B, Hq, T, D]
    logits = torch.einsum("bhqd,bhtd->bhqt", queries.float(), k) * scaling
    q_pos = torch.arange(length - n, length, device=keys.device)[:, None]
    logits = logits.masked_fill(torch.arange(length, device=keys.device)[None, :] > q_pos, float("-inf"))
    return logits.softmax(dim=-1)


def _keep_snapkv(snap: SnapKV, keys: Tensor, queries: Tensor, scaling: float) -> Tensor:
    length, heads = keys.shape[2], keys.shape[1]
    keep = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device)
    if length <= snap.budget:
        return keep | True
    obs = queries.shape[2]
    rep = queries.shape[1] // heads
    attn = attention_weights(queries, keys, scaling).mean(dim=2)  # [B, Hq, T]
    attn = attn.reshape(attn.shape[0], heads, rep, length).mean(dim=2)  # [B, H, T]
    n_old = length - obs
    old = F.avg_pool1d(attn[..., :n_old], snap.pool, stride=1, padding=snap.pool // 2, count_include_pad=False)
    best = torch.sort(old, dim=-1, descending=True, stable=True).indices[..., :snap.budget - obs]
    keep.scatter_(-1, best, True)
    keep[..., n_old:] = True
    return keep


class _Answer:
    """Hook for the question + answer tokens: context keys visible per head only where ``keep`` says so."""

    def __init__(self, keep: dict[int, Tensor], context_len: int) -> None:
        self.keep, self.context_len = keep, context_len

    def __call__(self, module: AttentionModule, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, base_fn: AttentionFn, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        keep = self.keep.get(module.layer_idx)
        if keep is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        n, total = query.shape[2], key.shape[2]
        rep = query.shape[1] // key.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()  # new tokens among themselves
        vis = torch.cat([keep[:, :, None, :].expand(-1, -1, n, -1),
                         causal.expand(keep.shape[0], keep.shape[1], n, n)], dim=-1)  # [B, H, n, T_c + n]
        assert vis.shape[-1] == total
        mask = torch.zeros(vis.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~vis, torch.finfo(query.dtype).min).repeat_interleave(rep, dim=1)
        kwargs.pop("is_causal", None)
        return base_fn(module, query, key, value, mask, **kwargs)


@torch.inference_mode()
def run_passkey(model: Any, trials: Sequence[PasskeyTrial],
                policies: dict[str, LayerwisePolicy | EvictionPolicy | SnapKV | None],
                progress: Any = None) -> PasskeyRun:
    """Accuracy of each policy (label -> an eviction policy, a :class:`SnapKV`, or None for the full cache)."""
    from transformers import DynamicCache
    from transformers.cache_utils import CacheLayerMixin

    from qfilters.cache import cache_kwargs

    compress = compressed_layers(model)
    device = next(model.parameters()).device
    observe = max([p.observe for p in policies.values() if isinstance(p, SnapKV)], default=1)
    run = PasskeyRun(hits={label: [] for label in policies}, logprob={label: [] for label in policies})
    for trial in trials:
        run.depths.append(trial.depth)
        ctx = torch.tensor([trial.context], device=device)
        cache = DynamicCache(config=model.config)
        prefill = _Prefill(observe)
        with attention_hook(model, prefill):
            model(ctx, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        tail = torch.tensor([trial.question + trial.answer], device=device)
        t_c, n_q, n_a = len(trial.context), len(trial.question), len(trial.answer)
        positions = torch.arange(t_c, t_c + tail.shape[1], device=device)
        target = torch.tensor(trial.answer, device=device)
        for label, pol in policies.items():
            keep: dict[int, Tensor] = {}
            for i in compress:
                cached = cache.layers[i]
                assert isinstance(cached, CacheLayerMixin) and cached.keys is not None  # attention, filled by prefill
                keys = cached.keys[..., :t_c, :]
                if isinstance(pol, SnapKV):
                    keep[i] = _keep_snapkv(pol, keys, prefill.queries[i], prefill.scaling[i])
                elif pol is not None and (layer := pol.for_layer(i)) is not None:
                    keep[i] = _keep_static(layer, keys, i)
            with attention_hook(model, _Answer(keep, t_c)):
                logits = model(tail, **cache_kwargs(model, cache), use_cache=True, position_ids=positions[None],
                               cache_position=positions).logits  # [1, n, V]
            for cached in cache.layers:  # back to the context (crop()'s sign convention changed across versions)
                assert isinstance(cached, CacheLayerMixin) and cached.keys is not None and cached.values is not None
                cached.keys, cached.values = cached.keys[..., :t_c, :], cached.values[..., :t_c, :]
            answer_logits = logits[0, n_q - 1:n_q - 1 + n_a].float()  # [n_a, V]: predicts the key's tokens
            run.hits[label].append(bool((answer_logits.argmax(dim=-1) == target).all()))
            logp = answer_logits.log_softmax(dim=-1).gather(-1, target[:, None]).sum()
            run.logprob[label].append(float(logp))
        if progress is not None:
            progress(len(run.depths))
    return run


def standard_policies(model: Any, budgets: Sequence[int], window: int = 64, filters: Any = None,
                      moments: Any = None, context_length: int | None = None) -> dict[str, Any]:
    """Full cache, then per budget: StreamingLLM (4 sinks), K-norm, Q-Filters / mean query / Gaussian when given,
    novelty, content novelty (RoPE models), the filter set's searched recipe when it carries one, and the SnapKV
    reference; the scorers keep ``min(window, budget // 2)`` recent keys, uniformly per layer."""
    from qfilters.policy_table import RECIPE, ScorerInputs, build_scorer
    from qfilters.rope import rope_frequencies

    try:
        rope = rope_frequencies(model)
    except ValueError:  # no fixed-frequency RoPE to undo: no content novelty row
        rope = None
    inputs = ScorerInputs(filters=filters, query_stats=moments, n_sinks=4, rope=rope)
    book = getattr(filters, "recipe", None)
    recipes = book.policies(budgets, model, inputs, context_length) if book is not None else {}
    names = ["streamingllm", "knorm"] + (["qfilters"] if filters is not None else []) + (
        ["meanq", "gaussian"] if moments is not None else []) + ["novelty"] + (
        ["content-novelty"] if rope is not None else [])
    scorers = {name: build_scorer(name, inputs) for name in names}
    layers = compressed_layers(model)
    out: dict[str, Any] = {"full": None}
    for b in budgets:
        for name, scorer in scorers.items():
            out[f"{name}@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(scorer, b, min(window, b // 2)), layers)
        if b in recipes:
            out[f"{RECIPE}@{b}"] = recipes[b]
        out[f"snapkv@{b}"] = SnapKV(b)
    return out
