"""The model card (``README.md``) of a published filter repo: YAML metadata the Hub understands, and a body that says
what the filters are, how to use them, how they validated and where they come from.

Metadata choices:

* ``base_model`` is the base model's Hub id, so the repo is listed from the base model's page (its "model tree") and
  ``HfApi.list_models(filter="base_model:<id>")`` finds it.
* ``base_model_relation: adapter``. The Hub knows four relations (adapter, merge, quantized, finetune) and, when the
  field is absent, guesses one from the files; a repo with ``config.json`` + ``model.safetensors`` would be guessed a
  *finetune*, i.e. a full copy of the model with changed weights, which Q-Filters are not. They are a small side
  artifact used on top of the unchanged base weights at inference time, which is what the Hub lists under
  "Adapters"; not a quantization (no compressed copy of the weights) and not a merge. ``adapter`` keeps the repo
  discoverable from the base model without claiming it replaces it.
* ``library_name: qfilters`` explicitly (the Hub would otherwise guess ``transformers`` from ``config.json``); no
  ``pipeline_tag``, since the repo cannot generate text on its own.
* ``tags``: ``q-filters``, ``kv-cache-compression``, the architecture (``model_type``) and the verdict as
  ``qfilters-verdict:pass|fail`` (``unvalidated`` without a report), which clients use to prefer passing filters.
* ``datasets``: only calibration sets that are Hub datasets (``hf:NAME:...`` specs); the others are listed in the body.
* ``license``: inherited from the base model when known (argument, the embedded models' licenses, or the base
  model's own card when the caller looked it up).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qfilters.artifact_format import RECIPE_KEY
from qfilters.errors import ArtifactError

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

    from qfilters.recipes import RecipeBook
    from qfilters.validation.schema import ValidationReport

BASE_MODEL_RELATION = "adapter"
LIBRARY_NAME = "qfilters"
CORE_TAGS = ("q-filters", "kv-cache-compression")
VERDICT_TAG = "qfilters-verdict:{}"
# Licenses of the base models qfilters embeds (their Hub cards say so); others come from the caller or the Hub.
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "google/gemma-3-270m": "gemma"}
_SLUG = re.compile(r"[^a-z0-9]+")
USAGE_HEADING = "### Use these filters"  # where qfilters.validation.markdown starts its usage snippets
PASSKEY_FIGURE = "report/passkey.png"  # repo path of the passkey accuracy figure (when the test ran)


def figure_name(spec: str, index: int) -> str:
    """Repo path of the perplexity figure of one evaluation dataset (stable, URL-safe)."""
    slug = _SLUG.sub("-", spec.lower()).strip("-")[:40] or "dataset"
    return f"report/perplexity-{index}-{slug}.png"


def hub_datasets(specs: Sequence[str]) -> list[str]:
    """The Hub dataset ids among dataset specs (``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` -> ``NAME``)."""
    out: list[str] = []
    for spec in specs:
        head, _, rest = spec.partition(":")
        if head.lower() == "hf" and rest:
            name = rest.split(":", 1)[0]
            if name and name not in out:
                out.append(name)
    return out


def read_metadata(filter_dir: Path) -> dict[str, Any]:
    """``qfilters.json`` of an artifact directory ({} when absent: third-party filters)."""
    path = Path(filter_dir) / "qfilters.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(path, f"cannot be read as JSON ({e}); re-save the filters") from e
    return data if isinstance(data, dict) else {}


def card_metadata(*, base_model: str, model_type: str | None, verdict: str | None, dataset_specs: Sequence[str],
                  license: str | None) -> dict[str, Any]:
    """The YAML front matter, as plain data (the order the Hub shows)."""
    tags = [*CORE_TAGS]
    if model_type:
        tags.append(model_type)
    tags.append(VERDICT_TAG.format(verdict or "unvalidated"))
    meta: dict[str, Any] = {"base_model": base_model, "base_model_relation": BASE_MODEL_RELATION,
                            "library_name": LIBRARY_NAME, "tags": tags}
    datasets = hub_datasets(dataset_specs)
    if datasets:
        meta["datasets"] = datasets
    license = license or KNOWN_LICENSES.get(base_model)
    if license:
        meta["license"] = license
    return meta


def build_model_card(filter_dir: str | Path, *, repo_id: str, report: ValidationReport | None = None,
                     base_model: str | None = None, license: str | None = None,
                     figures: Sequence[tuple[str, str]] = ()) -> ModelCard:
    """The model card of the filters in ``filter_dir`` published as ``repo_id``.

    ``report`` adds the verdict tag, the validation section (table, stability, perplexity, usage); ``figures`` are
    ``(repo path, caption)`` of images committed with the card; ``base_model`` overrides the id recorded in the
    artifact's provenance.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from qfilters.validation.markdown import md

    filter_dir = Path(filter_dir)
    meta = read_metadata(filter_dir)
    provenance = meta.get("provenance") or {}
    base_info = provenance.get("base_model") or {}
    base = base_model or (report.model_id if report is not None else None) or base_info.get("model_id")
    if not base:
        raise ArtifactError(filter_dir, "the base model is unknown (no validation report, no provenance in "
                                        "qfilters.json): pass base_model='org/name'")
    model_type = (report.architecture.model_type if report is not None else None) or base_info.get("model_type")
    calibration = provenance.get("calibration") or {}
    specs = list(report.settings.calibration) if report is not None else \
        [d.get("spec", "") for d in calibration.get("datasets", []) if isinstance(d, dict)]
    data = card_metadata(base_model=base, model_type=model_type,
                         verdict=report.verdict.status if report is not None else None,
                         dataset_specs=specs, license=license)
    card_data = ModelCardData(**data)

    shape = [meta.get("num_layers"), meta.get("num_kv_heads"), meta.get("kv_head_dim")]
    lines = [f"# Q-Filters for {md(base)}", "",
             f"[Q-Filters](https://arxiv.org/abs/2503.02812) for [`{base}`](https://huggingface.co/{base}): one "
             "direction per layer and KV head that scores cached keys, so the KV cache can evict the least useful "
             "ones during generation (compatible with FlashAttention, O(d) per key). This repo holds only the "
             "filters (`model.safetensors`, one float32 tensor `q_filters`"
             + (f" of shape `{shape}`" if all(isinstance(x, int) for x in shape) else "")
             + "); load the base model from its own repo.", ""]
    if report is not None:
        from qfilters.validation.markdown import render_markdown

        # the figures go with the validation results, before the usage snippets
        results, heading, usage = render_markdown(report, repo_id=repo_id).rstrip().partition(USAGE_HEADING)
        lines.append(results.rstrip())
        lines += _figures(figures)
        if heading:
            lines += ["", heading + usage]
    else:
        lines += _figures(figures) + [""] + _usage(base, repo_id, _recipe(meta), meta.get("num_kv_heads"))
    lines += ["", *_provenance(meta, provenance, specs, report)]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n")
    return card


def _figures(figures: Sequence[tuple[str, str]]) -> list[str]:
    from qfilters.validation.markdown import md

    out: list[str] = []
    for path, caption in figures:
        out += ["", f"![{md(caption)}]({path})", "", f"*{md(caption)}*"]
    return out


def _recipe(meta: dict[str, Any]) -> RecipeBook | None:
    """The artifact's stored recipe (checked as the loader checks it), or None."""
    from qfilters.recipes import RecipeBook

    try:
        return RecipeBook.from_dict(meta[RECIPE_KEY]) if meta.get(RECIPE_KEY) is not None else None
    except ValueError:
        return None  # a malformed one is the loader's error to report, not the card's


def _usage(base: str, repo_id: str, book: RecipeBook | None = None, kv_heads: int | None = None) -> list[str]:
    from qfilters.validation.markdown import model_line

    cache_line = ("cache = QFiltersCache(model, filters, budget=512)  # the eviction recipe stored with the filters"
                  if book is not None else
                  "cache = QFiltersCache(model, QFilterScorer(filters), budget=512, window=64)")
    allocations = [r.allocation for r in book.by_budget.values()] if book is not None else []
    snippet = (
        "from transformers import AutoModelForCausalLM\n"
        "from qfilters import QFilters, QFiltersCache, QFilterScorer\n\n"
        f"{model_line(base, allocations, kv_heads)}\n"
        f"filters = QFilters.from_pretrained({repo_id!r})\n"
        f"{cache_line}\n"
        "out = model.generate(input_ids, cache=cache, max_new_tokens=256)"
    )
    kvpress = (
        "from kvpress import QFilterPress\n"
        "from kvpress.presses.qfilter_press import QFilters\n\n"
        "class MyQFilterPress(QFilterPress):\n"
        "    def post_init_from_model(self, model):\n"
        f"        self.q_filters = QFilters.from_pretrained({repo_id!r}).q_filters.to(model.dtype)\n\n"
        "press = MyQFilterPress(compression_ratio=0.5)"
    )
    return ["## Use these filters", "", "These filters have no validation report.", "",
            "With `qfilters`:", "", "```python", snippet, "```", "",
            "With NVIDIA kvpress (same `config.json` + `model.safetensors` format):", "", "```python", kvpress, "```"]


def _provenance(meta: dict[str, Any], provenance: dict[str, Any], specs: Sequence[str],
                report: ValidationReport | None) -> list[str]:
    from qfilters.validation.markdown import md

    base_info = provenance.get("base_model") or {}
    calibration = provenance.get("calibration") or {}
    rows = [("qfilters version", meta.get("library_version")), ("tensor sha256", meta.get("tensor_sha256")),
            ("base model revision", base_info.get("revision") or (report.model_revision if report else None)),
            ("calibration tokens", calibration.get("tokens")), ("sequence length", calibration.get("seq_len")),
            ("seed", calibration.get("seed")), ("dtype", calibration.get("dtype")),
            ("torch / transformers", " / ".join(str(calibration[k]) for k in ("torch_version", "transformers_version")
                                                if calibration.get(k)) or None)]
    book = _recipe(meta)
    if book is not None:
        rows.append(("eviction recipe", "; ".join(f"budget {b}: {r.describe()}" for b, r in book.by_budget.items())
                     + f" (searched on {book.searched_on or 'calibration text'})"))
    lines = ["## Provenance", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {md(value)} |" for name, value in rows if value not in (None, "")]
    datasets = [d for d in calibration.get("datasets", []) if isinstance(d, dict)]
    if datasets:
        lines += ["", "| Calibration dataset | Content sha256 | Tokens |", "| --- | --- | ---: |"]
        lines += [f"| `{md(d.get('spec'))}` | `{md(d.get('sha256'))}` | {d.get('tokens', '')} |" for d in datasets]
    elif specs:
        lines += ["", "Calibration datasets: " + ", ".join(f"`{md(s)}`" for s in specs)]
    if report is not None:
        lines += ["", "The full validation report is in [`report/report.html`](report/report.html) "
                      "(machine-readable: [`report/report.json`](report/report.json))."]
    return lines
