"""qfilters: Q-Filters KV-cache compression for any transformers causal LM.

Heavy submodules (torch, transformers) load lazily, so ``import qfilters`` stays cheap and the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "QFilters": "qfilters.artifact",
    "QFiltersCache": "qfilters.cache",
    "cache_kwargs": "qfilters.cache",
    "EvictionPolicy": "qfilters.policy",
    "LayerwisePolicy": "qfilters.policy",
    "Scorer": "qfilters.scorers",
    "QFilterScorer": "qfilters.scorers",
    "KNormScorer": "qfilters.scorers",
    "StreamingLLMScorer": "qfilters.scorers",
    "RandomScorer": "qfilters.scorers",
    "NoveltyScorer": "qfilters.scorers",
    "BlendScorer": "qfilters.scorers",
    "AgedScorer": "qfilters.scorers",
    "calibrate": "qfilters.calibrate",
    "load_model": "qfilters.models",
    "load_corpus": "qfilters.data",
}

__all__ = [  # spelled out (not derived from _LAZY) so linters and type checkers see the public names
    "AgedScorer", "BlendScorer", "EvictionPolicy", "KNormScorer", "LayerwisePolicy", "NoveltyScorer", "QFilterScorer",
    "QFilters", "QFiltersCache", "RandomScorer", "Scorer", "StreamingLLMScorer", "__version__", "cache_kwargs",
    "calibrate", "load_corpus", "load_model",
]

if TYPE_CHECKING:  # pragma: no cover
    from qfilters.artifact import QFilters
    from qfilters.cache import QFiltersCache, cache_kwargs
    from qfilters.calibrate import calibrate
    from qfilters.data import load_corpus
    from qfilters.models import load_model
    from qfilters.policy import EvictionPolicy, LayerwisePolicy
    from qfilters.scorers import (
        AgedScorer,
        BlendScorer,
        KNormScorer,
        NoveltyScorer,
        QFilterScorer,
        RandomScorer,
        Scorer,
        StreamingLLMScorer,
    )


assert set(__all__) == {"__version__", *_LAZY}, "keep __all__ and _LAZY in step"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qfilters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
