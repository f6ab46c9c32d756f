"""Skip the unchanged layers of a pass: replay the decoder layers' full-cache outputs up to the first layer a policy
changes.

The sensitivity measurements (:func:`qfilters.recipes.layer_sensitivity`, :func:`qfilters.recipes.head_sensitivity`)
compress one layer, or one KV head of one layer, at a time. Every layer before it computes exactly what it computes
under the full cache, so recomputing them is wasted work: about half of each pass when the compressed layer runs
over the whole depth. :class:`LayerReplay` records each decoder layer's output once, on the full-cache pass the
measurement makes anyway, and a pass inside :meth:`LayerReplay.starting_at` gets those recorded outputs back from
the earlier layers without running them. The later layers see the very tensors a full pass would hand them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qfilters.attention import attention_layers
from qfilters.errors import ModelError

__all__ = ["LayerReplay", "decoder_layers", "replayable"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks holding the attention modules, in layer order (each attention module's parent)."""
    return _parents(model, attention_layers(model))


def replayable(model: nn.Module) -> bool:
    """Whether skipping early layers is exact for ``model``: one attention block per layer, in order (a hybrid
    model's linear-attention layers would shift the indices), and no layer that hands later ones anything besides
    its output (layers sharing K/V, as in Gemma-3n)."""
    return _replay_blocks(model) is not None


def _parents(model: nn.Module, attentions: list[nn.Module]) -> list[nn.Module]:
    names = {module: name for name, module in model.named_modules()}
    blocks = []
    for attention in attentions:
        parent = names[attention].rpartition(".")[0]
        if not parent:
            raise ModelError(f"{type(model).__name__}'s attention module {names[attention]!r} has no decoder block")
        blocks.append(model.get_submodule(parent))
    return blocks


def _replay_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The decoder blocks to replay, one per layer in order; None where :func:`replayable` says no."""
    from qfilters.architecture import text_config

    config = text_config(model)
    if getattr(config, "num_kv_shared_layers", 0):
        return None
    try:
        attentions = attention_layers(model)
        blocks = _parents(model, attentions)
    except ModelError:
        return None
    in_order = [a.layer_idx for a in attentions] == list(range(len(blocks)))
    one_each = len(blocks) == int(config.num_hidden_layers) == len({id(b) for b in blocks})
    return blocks if in_order and one_each else None


class LayerReplay:
    """The decoder layers' outputs on one input, recorded under the full cache, to replay in later passes.

    ``with replay.recording(input_ids): model(input_ids)`` records; ``with replay.starting_at(i, input_ids):
    model(input_ids)`` runs layers ``i`` and later only (the earlier ones return what they returned while
    recording). The input must be the recorded one, and so must the other arguments of the call (mask, caching):
    replaying another input's layers would be silently wrong. While a block runs, the model is patched for every
    caller. Models :func:`replayable` refuses raise :class:`~qfilters.errors.ModelError`.
    """

    def __init__(self, model: nn.Module) -> None:
        blocks = _replay_blocks(model)
        if blocks is None:
            raise ModelError(f"{type(model).__name__}'s layers cannot be replayed (see qfilters.replay.replayable)")
        self.layers = blocks
        self.outputs: list[Any] = []
        self.input_ids: Tensor | None = None

    @contextmanager
    def recording(self, input_ids: Tensor) -> Iterator[None]:
        """Record every decoder layer's output during the (single) forward pass made inside the block."""
        outputs: dict[int, Any] = {}

        def keep(index: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if index in outputs:
                    raise ModelError("LayerReplay records one forward pass; the block made several")
                outputs[index] = _copied(output)  # the next layer could change its input in place
            return hook

        handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if len(outputs) != len(self.layers):
            raise ModelError(f"recorded {len(outputs)} of {len(self.layers)} decoder layers: the block must make one "
                             "full forward pass")
        self.outputs = [outputs[i] for i in range(len(self.layers))]
        self.input_ids = input_ids.detach().clone()

    @contextmanager
    def starting_at(self, start: int, input_ids: Tensor) -> Iterator[None]:
        """Inside the block, layers ``0..start-1`` return their recorded outputs without computing anything."""
        if self.input_ids is None:
            raise ModelError("nothing recorded: run the full-cache pass inside LayerReplay.recording first")
        if not 0 <= start <= len(self.layers):
            raise ValueError(f"start must be a layer index in [0, {len(self.layers)}], got {start}")
        if input_ids.shape != self.input_ids.shape or not torch.equal(input_ids.cpu(), self.input_ids.cpu()):
            raise ValueError("LayerReplay replays the input it recorded; this pass has another one")
        skipped = self.layers[:start]
        own = [layer.__dict__.get("forward") for layer in skipped]  # e.g. accelerate's offload wrapper: put back
        for i, (layer, output) in enumerate(zip(skipped, self.outputs, strict=False)):
            # an instance attribute: nn.Module.__call__ looks it up first. Only the last skipped layer's output
            # reaches a layer that computes: a copy, so a layer that changes its input in place cannot alter the
            # recording for later replays.
            layer.forward = _returning(_copied(output) if i == start - 1 else output)
        try:
            yield
        finally:
            for layer, previous in zip(skipped, own, strict=True):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous


def _copied(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_copied(x) for x in output)
    return output


def _returning(output: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return output
    return forward
