"""Novelty measured before RoPE. NoveltyScorer scores -cos(k_t, k_0 + ... + k_t) on the cached, post-RoPE keys: the
running sum of rotated keys cancels in the fast-rotating dimensions, so the cosine mostly reads the few slow ones.
Undoing the rotation first (exact: the position is known; O(d) per key, still causal and static) compares what the
keys say, not where they are. Passkey test (kvpress protocol, 48 needles, 1024-token contexts, seed 0) on Austen
filler (held out) and handbook:en filler (the retrieval gate's calibration text), at 128 / 256 / 512, against
StreamingLLM, post-RoPE novelty and the shipped recipe.
Usage: .venv/bin/python research/issue13/prerope_novelty.py artifacts/smollm2-handbook-en [trials]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from heldout import HERE, shipped_book

from qfilters import QFilters, load_corpus, load_model
from qfilters.architecture import compressed_layers
from qfilters.eviction import force_sinks
from qfilters.passkey import make_trials, run_passkey
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.scorers import NoveltyScorer, Scorer, StreamingLLMScorer

BUDGETS = (128, 256, 512)


def unrotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama-style RoPE undone: rotate each (i, i + d/2) pair back by its angle."""
    angles = positions.to(inv_freq)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [T, D]
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return keys * cos - rotated_half * sin


@dataclass
class PreRopeNovelty(Scorer):
    inv_freq: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    n_sinks: int = 4
    name: ClassVar[str] = "prerope-novelty"

    def score(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        plain = unrotate(keys.double(), positions, self.inv_freq.double())
        running = plain.cumsum(dim=2)
        scores = -torch.nn.functional.cosine_similarity(plain, running, dim=-1).float()
        return force_sinks(scores, positions, self.n_sinks)


def rope_inv_freq(model: Any) -> torch.Tensor:
    return model.model.rotary_emb.inv_freq.detach().float().cpu()


def patch_novelty_classes() -> None:
    """NoveltyScorer and BlendScorer instances tagged by :func:`tag_prerope` compute novelty on un-rotated keys
    (the blend's base still scores the cached keys); untagged ones run as in the library."""
    from qfilters.scorers import BlendScorer, _check_keys, _check_row, novelty_stream

    def novelty_of(self: Any, keys: torch.Tensor, positions: torch.Tensor, state: Any) -> Any:
        inv = getattr(self, "prerope", None)
        return novelty_stream(keys if inv is None else unrotate(keys.double(), positions, inv.double()), state)

    def novelty_score_stream(self, keys, layer_idx, positions, state):  # type: ignore[no-untyped-def]
        _check_keys(keys, positions)
        scores, new_state = novelty_of(self, keys, positions, state)
        return force_sinks(scores, positions, self.n_sinks), new_state

    def blend_score_stream(self, keys, layer_idx, positions, state):  # type: ignore[no-untyped-def]
        _check_keys(keys, positions)
        _check_row(self.weights, keys, layer_idx, "blend weights")
        novelty, new_state = novelty_of(self, keys, positions, state)
        weight = self.weights[layer_idx][None, :, None].to(novelty.device)
        scores = self.base.score(keys, layer_idx, positions).float() + weight * novelty
        return force_sinks(scores, positions, self.n_sinks), new_state

    NoveltyScorer.score_stream = novelty_score_stream  # type: ignore[method-assign]
    BlendScorer.score_stream = blend_score_stream  # type: ignore[method-assign]


def tag_prerope(policy: Any, inv_freq: torch.Tensor) -> Any:
    """Tag every novelty-reading scorer of ``policy`` (through AgedScorer wrappers) to un-rotate keys."""
    from qfilters.scorers import AgedScorer, BlendScorer

    if isinstance(policy, Scorer):
        object.__setattr__(policy, "prerope", inv_freq)
        return policy
    layers = policy.layers.values() if isinstance(policy, LayerwisePolicy) else [policy]
    for layer in layers:
        scorer = None if layer is None else layer.scorer
        while isinstance(scorer, AgedScorer):
            scorer = scorer.inner
        if isinstance(scorer, (NoveltyScorer, BlendScorer)):
            object.__setattr__(scorer, "prerope", inv_freq)
    return policy


if __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    n_trials = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    lm = load_model("smollm2")
    layers = compressed_layers(lm.model)
    inv_freq = rope_inv_freq(lm.model)
    # check the inverse against the model's own rotation on one random key
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    k = torch.randn(1, 1, 5, inv_freq.shape[0] * 2)
    pos = torch.arange(100, 105)
    cos, sin = lm.model.model.rotary_emb(k, pos[None])
    rotated, _ = apply_rotary_pos_emb(k, k, cos, sin)
    assert torch.allclose(unrotate(rotated, pos, inv_freq), k, atol=1e-4), "unrotate does not invert the model's RoPE"

    scorers = {"streamingllm": StreamingLLMScorer(4), "novelty": NoveltyScorer(),
               "prerope-novelty": PreRopeNovelty(inv_freq)}
    book = shipped_book()
    policies: dict[str, Any] = {"full": None}
    for b in BUDGETS:
        for name, scorer in scorers.items():
            policies[f"{name}@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(scorer, b, min(64, b // 2)), layers)
            if name != "streamingllm":
                policies[f"{name} w16@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(scorer, b, 16), layers)
        policies[f"shipped recipe@{b}"] = book.policy(b, lm.model, ScorerInputs(filters=filters), 1024)
    out: dict = {"filters": sys.argv[1], "trials": n_trials, "context": 1024, "seed": 0, "found": {}, "seconds": {}}
    for spec in ("austen", "handbook:en"):
        text = "\n".join(d.text for d in load_corpus(spec).documents)
        trials = make_trials(lm.tokenizer, text, n_trials, 1024, 0)
        t0 = time.time()
        run = run_passkey(lm.model, trials, policies)
        out["seconds"][spec] = round(time.time() - t0, 1)
        out["found"][spec] = {label: sum(hits) for label, hits in run.hits.items()}
        for label, hits in run.hits.items():
            print(f"{spec:12s} {label:32s} {sum(hits):3d}/{len(hits)}", flush=True)
    (HERE / "prerope-novelty.json").write_text(json.dumps(out, indent=1) + "\n")
