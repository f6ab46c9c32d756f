"""kvpress's ``QFilterPress`` with filters from anywhere ``QFilters.from_pretrained`` can load them.

kvpress 0.5.5 builds the repo name ``nthngdy/{model name}_qfilt`` itself and reloads it in ``post_init_from_model``
on every ``with press(model):``, overwriting filters set by hand, and loads non-strictly (a misnamed tensor leaves
random filters). This subclass keeps everything else of kvpress (scoring, compression, hooks, wrappers such as
``ChunkPress``) and replaces only that hook:

>>> from qfilters.integrations.kvpress import QFilterPress                       # doctest: +SKIP
>>> press = QFilterPress(compression_ratio=0.5, filters="acme/llama-3-8b-qfilters", revision="v3")  # doctest: +SKIP
>>> with press(model):                                                           # doctest: +SKIP
...     model(input_ids, past_key_values=cache)

``filters`` is a filter repo id, a base model id or a local directory; left unset, the model's own id is resolved
(registry, Hub search, then the official naming). Loading is strict, the shape is checked against the model, and the
tensor is loaded once per source, not on every use. Requires ``pip install kvpress`` (it is never a qfilters
dependency).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

try:
    from kvpress.presses.qfilter_press import QFilterPress as KvpressQFilterPress
except ImportError as e:  # pragma: no cover - exercised only without kvpress
    raise ImportError(
        "qfilters.integrations.kvpress needs NVIDIA's kvpress: pip install kvpress "
        "(qfilters itself loads filters without it: QFilters.from_pretrained)"
    ) from e

from qfilters.artifact import QFilters


@dataclass
class QFilterPress(KvpressQFilterPress):
    """kvpress's Q-Filters press, loading its filters through :meth:`QFilters.from_pretrained`.

    Parameters beyond kvpress's ``compression_ratio``: ``filters`` (repo id, base model id or local directory;
    ``None``: the model's ``name_or_path``), and ``revision`` / ``endpoint`` / ``token`` / ``cache_dir`` /
    ``local_files_only`` as in :meth:`QFilters.from_pretrained`. After a use, ``loaded`` holds the
    :class:`QFilters` (with ``source`` and provenance).
    """

    filters: str | os.PathLike[str] | None = None
    revision: str | None = None
    endpoint: str | None = None
    token: str | bool | None = field(default=None, repr=False)
    cache_dir: str | os.PathLike[str] | None = None
    local_files_only: bool = False
    loaded: QFilters | None = field(init=False, default=None, repr=False)
    _loaded_for: tuple[Any, ...] | None = field(init=False, default=None, repr=False)

    def post_init_from_model(self, model: Any) -> None:
        """Load (once per source and model shape) and install the filters in the model's dtype."""
        source = self.filters if self.filters is not None else model.config.name_or_path
        shape = model_filter_shape(model)
        key = (os.fspath(source), self.revision, self.endpoint, self.cache_dir, self.local_files_only, shape)
        if self.loaded is None or self._loaded_for != key:
            self.loaded = QFilters.from_pretrained(
                source, revision=self.revision, endpoint=self.endpoint, token=self.token, cache_dir=self.cache_dir,
                local_files_only=self.local_files_only, expected_shape=shape)
            self._loaded_for = key
        self.q_filters = self.loaded.filters.to(model.dtype)


def model_filter_shape(model: Any) -> tuple[int, int, int] | None:
    """``(layers, kv_heads, head_dim)`` from a transformers model's (text) config; ``None`` if it does not say."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and heads and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // heads
    if not (isinstance(layers, int) and isinstance(kv_heads, int) and isinstance(head_dim, int)):
        return None
    return (layers, kv_heads, head_dim)


__all__ = ["QFilterPress", "model_filter_shape"]
