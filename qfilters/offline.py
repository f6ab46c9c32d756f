"""Whether the Hugging Face libraries were told to stay offline: the one place qfilters decides it.

There are two honest answers, and each caller needs a specific one:

* what **huggingface_hub** decided: it reads ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` once, when it is imported,
  and its downloads obey that decision whatever the environment says later. Code that chooses between a cache lookup
  and ``hf_hub_download`` must agree with it (``from_environment=False``, the default);
* what the **environment** says now, including ``HF_DATASETS_OFFLINE``: for explaining why the ``datasets`` library
  failed, and for a server deciding per request whether to consult the Hub (``from_environment=True``).

Importing this module is free; huggingface_hub is imported only when its decision is asked for.
"""

from __future__ import annotations

import os

__all__ = ["OFFLINE_VARIABLES", "hf_offline"]

#: Environment variables that switch Hugging Face libraries offline (hub, datasets, transformers).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")


def hf_offline(*, from_environment: bool = False) -> bool:
    """True when Hugging Face offline mode is on; see the module docstring for which answer to ask for."""
    if from_environment:
        return any(os.environ.get(var, "").strip().lower() in _TRUE for var in OFFLINE_VARIABLES)
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)
