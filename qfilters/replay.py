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

__all__ = ["LayerReplay", "decoder_layers"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks holding the attention modules, in layer order (each attention module's parent)."""
    names = {module: name for name, module in model.named_modules()}
    blocks = []
    for attention in attention_layers(model):
        parent = names[attention].rpartition(".")[0]
        if not parent:
            raise ModelError(f"{type(model).__name__}'s attention module {names[attention]!r} has no decoder block")
        blocks.append(model.get_submodule(parent))
    return blocks


class LayerReplay:
    """The decoder layers' outputs on one input, recorded under the full cache, to replay in later passes.

    ``with replay.recording(input_ids): model(input_ids)`` records; ``with replay.starting_at(i, input_ids):
    model(input_ids)`` runs layers ``i`` and later only (the earlier ones return what they returned while
    recording). The input must be the recorded one: replaying another input's layers would be silently wrong.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
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
                outputs[index] = output
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
        for layer, output in zip(skipped, self.outputs, strict=False):
            layer.forward = _returning(output)  # an instance attribute: nn.Module.__call__ looks it up first
        try:
            yield
        finally:
            for layer, previous in zip(skipped, own, strict=True):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous


def _returning(output: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return output
    return forward
