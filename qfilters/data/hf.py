"""Hugging Face dataset splits (``hf:NAME[:CONFIG]:SPLIT[:COLUMN]``) through the optional ``datasets`` library.

Each non-blank row of the text column becomes one document, in the dataset's own row order (titled
``NAME/SPLIT#ROW``). ``datasets`` is imported only here, on first use, so the rest of qfilters works without it.
"""

from __future__ import annotations

from typing import Any

from qfilters.data.corpus import Document
from qfilters.data.spec import HFSpec, check_hub_dataset_name
from qfilters.errors import DatasetSpecError, DatasetUnavailableError
from qfilters.offline import hf_offline

#: ``datasets`` takes a path with this prefix from the Hub only (``remote_only``), even if a local directory matches.
HUB_PREFIX = "hf://datasets/"


def load_hf(spec: HFSpec) -> tuple[list[Document], str]:
    """Documents and source description for a Hugging Face dataset split."""
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(
            f"dataset spec {spec.normalized!r} needs the optional 'datasets' package: pip install 'qfilters[hf]'"
        ) from None
    label = spec.name + (f" ({spec.config})" if spec.config else "")
    path = spec.name
    if spec.hub_only:  # re-checked here: the loading process may not be the one that parsed the spec
        check_hub_dataset_name(spec.name, spec.normalized)
        path = HUB_PREFIX + spec.name  # datasets then resolves the name on the Hub only, never as a local directory
    try:
        table: Any = datasets.load_dataset(path, spec.config, split=spec.split)
    except ConnectionError as err:  # datasets raises this both offline and when the Hub is unreachable
        if hf_offline(from_environment=True):
            reason = ("Hugging Face offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and this dataset is "
                      "not in the local datasets cache. Unset offline mode with network access, or download it once "
                      "on a connected machine")
        else:
            reason = "the Hugging Face Hub is unreachable from here. Check the network or proxy settings"
        local = "" if spec.hub_only else "; alternatively use a local corpus (PATH/GLOB)"  # a service takes none
        raise DatasetUnavailableError(f"cannot load {spec.normalized!r}: {reason}{local}. Details: {err}") from None
    except FileNotFoundError as err:
        raise DatasetUnavailableError(f"cannot load {spec.normalized!r}: dataset {label} not found on the Hub or "
                                      f"locally ({err}). Check the name and configuration.") from None
    except ValueError as err:  # unknown split / config
        raise DatasetSpecError(f"dataset spec {spec.normalized!r}: {err}") from None
    except RuntimeError as err:  # e.g. a dataset script, which datasets no longer runs
        raise DatasetUnavailableError(f"cannot load {spec.normalized!r}: {err}") from None
    columns = list(getattr(table, "column_names", []) or [])
    if spec.column not in columns:
        raise DatasetSpecError(f"dataset spec {spec.normalized!r}: no column {spec.column!r} in {label} split "
                               f"{spec.split!r} (columns: {', '.join(columns)}); put the text column last, e.g. "
                               f"hf:{spec.name}:{spec.config or ''}:{spec.split}:{columns[0] if columns else 'text'}.")
    documents = [
        Document(f"{spec.name}/{spec.split}#{row}", value)
        for row, value in enumerate(table[spec.column])
        if isinstance(value, str) and value.strip()
    ]
    return documents, f"Hugging Face dataset {label}, split {spec.split}, column {spec.column}"
