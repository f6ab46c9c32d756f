"""Q-Filters artifacts: the filter tensor, how it scores keys, and its on-disk / Hub format.

The format is the one kvpress's ``QFilterPress`` and the official ``nthngdy/<model>_qfilt`` Hub repositories use
(huggingface_hub ``PyTorchModelHubMixin`` layout), so filters move both ways without conversion:

* ``config.json``: exactly ``{"kv_head_dim": D, "num_kv_heads": H, "num_layers": L}`` (the mixin turns these keys
  into constructor arguments);
* ``model.safetensors``: one float32 tensor ``q_filters`` of shape ``[L, H, D]``;
* ``qfilters.json`` (ours only, ignored by the mixin): provenance plus the sha256 of ``model.safetensors``, so a
  tampered or truncated download is caught instead of silently compressing with garbage; and, when a validation
  searched one, the eviction ``recipe`` that :class:`~qfilters.cache.QFiltersCache` uses by default.

Sign convention: the stored filter of a KV head is ``-v1+`` (``v1+`` = first right singular vector of its queries,
oriented along them), and a key ``k`` scores ``-(f . k)`` exactly as in kvpress: higher score = key kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qfilters.artifact_format import (
    ARTIFACT_FILES,
    BASE_FORMAT_VERSION,
    CONFIG_KEYS,
    CONFIG_NAME,
    FORMAT_VERSION,
    METADATA_NAME,
    RECIPE_KEY,
    TENSOR_NAME,
    WEIGHTS_NAME,
    check_artifact,
    check_digest,
    check_finite,
    read_files,
    sha256_file,
)
from qfilters.errors import ArtifactError, ArtifactNotFoundError, ShapeMismatchError
from qfilters.fileio import atomic_directory, atomic_path, atomic_write_text

if TYPE_CHECKING:
    from qfilters.recipes import RecipeBook

logger = logging.getLogger(__name__)

_IN_MEMORY = "<in-memory Q-Filters>"
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class QFilters:
    """Per-layer, per-KV-head Q-Filters in the public (kvpress / official Hub) format.

    ``filters`` is the stored tensor ``[num_layers, num_kv_heads, head_dim]`` (float32, sign already public: ``-v1+``).
    ``provenance`` is free-form JSON-able metadata written to ``qfilters.json``; empty for third-party artifacts.
    """

    def __init__(self, filters: torch.Tensor, provenance: dict[str, Any] | None = None) -> None:
        if not isinstance(filters, torch.Tensor):
            raise ArtifactError(_IN_MEMORY, f"filters must be a torch.Tensor, got {type(filters).__name__}")
        if filters.dim() != 3 or min(filters.shape) == 0:
            raise ShapeMismatchError(
                f"Q-Filters must be a non-empty 3-D tensor [num_layers, num_kv_heads, head_dim], "
                f"got shape {tuple(filters.shape)}"
            )
        if not (filters.is_floating_point() or filters.dtype in _INT_DTYPES):
            raise ArtifactError(_IN_MEMORY, f"filters must hold real numbers, got dtype {filters.dtype}")
        filters = filters.detach().to(torch.float32).contiguous()
        check_finite(filters, _IN_MEMORY)
        if provenance is not None and not isinstance(provenance, dict):
            raise ArtifactError(_IN_MEMORY, f"provenance must be a dict, got {type(provenance).__name__}")
        self._set(filters, dict(provenance or {}))

    @classmethod
    def _checked(cls, filters: torch.Tensor, provenance: dict[str, Any]) -> QFilters:
        """An instance from a tensor the loader already checked (float32, contiguous, 3-D, finite): no second pass."""
        instance = cls.__new__(cls)
        instance._set(filters, provenance)
        return instance

    def _set(self, filters: torch.Tensor, provenance: dict[str, Any]) -> None:
        self.filters: torch.Tensor = filters
        self.provenance: dict[str, Any] = provenance
        # Bookkeeping read from qfilters.json (format/library version, sha256); empty for in-memory or third-party.
        self.artifact_info: dict[str, Any] = {}
        # Where from_pretrained found the files ({"kind": "local" | "repo" | "registry" | "hub-search" | "official"}).
        self.source: dict[str, Any] = {}
        # The eviction recipe a validation chose for these filters (qfilters.json "recipe"); None: the stock policy.
        self.recipe: RecipeBook | None = None

    def with_recipe(self, recipe: RecipeBook | None) -> QFilters:
        """The same filters carrying ``recipe`` (saved to ``qfilters.json``; ``None`` drops it)."""
        from qfilters.recipes import RecipeBook

        if recipe is not None and not isinstance(recipe, RecipeBook):
            raise TypeError(f"recipe must be a qfilters.recipes.RecipeBook or None, got {type(recipe).__name__}")
        out = QFilters._checked(self.filters, dict(self.provenance))
        out.artifact_info, out.source, out.recipe = dict(self.artifact_info), dict(self.source), recipe
        return out

    # ------------------------------------------------------------------ shape facts
    @property
    def num_layers(self) -> int:
        return int(self.filters.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.filters.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.filters.shape[2])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.head_dim)

    def __repr__(self) -> str:
        return (
            f"QFilters(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"provenance_keys={sorted(self.provenance)})"
        )

    # ------------------------------------------------------------------ construction from calibration
    @classmethod
    def from_query_filters(
        cls, query_filters: torch.Tensor, num_kv_heads: int, provenance: dict[str, Any] | None = None
    ) -> QFilters:
        """Build the stored tensor from per-query-head filters.

        ``query_filters`` is ``[L, H_q, D]``: the sign-fixed ``v1+`` of each query head (pointing *along* its
        queries). Query head ``h`` belongs to KV head ``h // (H_q // H_kv)`` (``repeat_kv`` order); a KV head's filter
        is the plain mean of its query heads' filters (not renormalised, as in the official filters), negated into
        the public sign convention.
        """
        if not isinstance(query_filters, torch.Tensor) or query_filters.dim() != 3:
            shape = tuple(query_filters.shape) if isinstance(query_filters, torch.Tensor) else type(query_filters)
            raise ShapeMismatchError(f"query_filters must be a 3-D tensor [L, H_q, D], got {shape}")
        num_layers, num_q_heads, head_dim = query_filters.shape
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0:
            raise ShapeMismatchError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
        if num_q_heads % num_kv_heads:
            raise ShapeMismatchError(
                f"{num_q_heads} query heads cannot be grouped onto {num_kv_heads} KV heads "
                f"(grouped-query attention needs H_q to be a multiple of H_kv)"
            )
        group = num_q_heads // num_kv_heads
        grouped = query_filters.detach().to(torch.float32).reshape(num_layers, num_kv_heads, group, head_dim)
        return cls(-grouped.mean(dim=2), provenance=provenance)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write the artifact (``config.json``, ``model.safetensors``, ``qfilters.json``) and return its directory.

        Atomic: everything is written to a sibling temporary directory that then replaces ``save_directory``, so a
        failure never leaves a half-written artifact (files in an existing directory that are not artifact files,
        such as a README.md model card, are carried over). Deterministic: the same tensor gives the same bytes,
        hence the same sha256, wherever and whenever it is saved. The files get ordinary permissions (0644 minus the
        umask), like any file the user writes.
        """
        target = Path(save_directory).expanduser()
        if target.is_symlink():
            target = target.resolve()
        target = target.absolute()
        if target.exists() and not target.is_dir():
            raise ArtifactError(target, "exists and is not a directory; choose a directory path to save Q-Filters to")
        if target.is_dir() and not overwrite and any((target / name).exists() for name in ARTIFACT_FILES):
            raise ArtifactError(
                target, "already holds a Q-Filters artifact; pass overwrite=True or choose another directory"
            )
        try:
            provenance_json = json.loads(json.dumps(self.provenance, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ArtifactError(
                target, f"provenance is not JSON-serialisable ({e}); keep it to plain JSON values"
            ) from e

        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as tmp:
            self._write_files(tmp, provenance_json)
            if target.is_dir():
                _carry_over_foreign_files(target, tmp)
        logger.info("Saved Q-Filters %s to %s", self.shape, target)
        return target

    def _write_files(self, directory: Path, provenance: dict[str, Any]) -> None:
        import safetensors.torch  # attribute looked up at call time so tests can simulate a failing write

        weights = directory / WEIGHTS_NAME
        # No metadata: byte-identical to what PyTorchModelHubMixin (safetensors.torch.save_model) writes.
        with atomic_path(weights) as tmp:  # ordinary permissions, not the 0600 safetensors gives its own files
            safetensors.torch.save_file({TENSOR_NAME: self.filters.detach().cpu().contiguous()}, str(tmp))
        config = {"kv_head_dim": self.head_dim, "num_kv_heads": self.num_kv_heads, "num_layers": self.num_layers}
        # Same serialisation as PyTorchModelHubMixin.save_pretrained, so config.json is byte-identical too.
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, sort_keys=True, indent=2))
        from qfilters import __version__

        metadata = {
            "format_version": FORMAT_VERSION if self.recipe is not None and self.recipe.needs_format_2
            else BASE_FORMAT_VERSION,
            "library": "qfilters",
            "library_version": __version__,
            "tensor_name": TENSOR_NAME,
            "tensor_dtype": "float32",
            "tensor_shape": list(self.shape),
            "tensor_sha256": sha256_file(weights),
            **config,
            "provenance": provenance,
        }
        if self.recipe is not None:
            metadata[RECIPE_KEY] = self.recipe.to_dict()
        atomic_write_text(directory / METADATA_NAME,
                          json.dumps(metadata, sort_keys=True, indent=2, allow_nan=False) + "\n")

    def push_to_hub(self, repo_id: str, *, report_dir: str | os.PathLike[str] | None = None, tag: str | None = None,
                    token: str | bool | None = None, endpoint: str | None = None, private: bool = False,
                    base_model: str | None = None, license: str | None = None, card: Any = None) -> Any:
        """Publish these filters (with a model card, and the validation report if given) as one commit of
        ``repo_id``; see :func:`qfilters.hub.publish`. Returns its :class:`~qfilters.hub.PublishResult`."""
        import tempfile

        from qfilters.hub import publish

        with tempfile.TemporaryDirectory(prefix="qfilters-push-") as tmp:
            directory = self.save_pretrained(Path(tmp) / "filters")
            return publish(directory, repo_id, card=card, report_dir=report_dir, tag=tag, token=token,
                           endpoint=endpoint, private=private, base_model=base_model, license=license)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike[str],
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        endpoint: str | None = None,
        force_download: bool = False,
        expected_shape: tuple[int, int, int] | None = None,
    ) -> QFilters:
        """Load filters from a filter repo, a base model id, or a local directory.

        ``repo_or_dir`` is (c) a local directory; (a) a filter repo on the Hub endpoint (ours, kvpress's or an
        official ``_qfilt`` repo): one whose ``config.json`` is a Q-Filters config; or (b) a base model id, resolved
        through the registry at ``$QFILTERS_REGISTRY_URL``, else a Hub search for repos tagged ``q-filters`` and
        ``base_model:<id>`` (a passing verdict first), else the official ``nthngdy/<name>_qfilt`` naming (see
        :mod:`qfilters.resolve`). ``revision`` pins the filter repo (branch, tag such as ``v3``, or commit); through
        the registry it is the base model's revision. Hub downloads go through huggingface_hub, so the HF cache,
        ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` behave as everywhere else; offline, ids resolve from
        what earlier calls cached. Nothing found raises :class:`FiltersNotFoundError` listing every place tried.

        Loading is strict because kvpress's own loader is not (it loads with ``strict=False`` and would keep random
        filters on a misnamed tensor): anything malformed raises :class:`ArtifactError` naming the file, a file whose
        sha256 differs from the one recorded in ``qfilters.json`` (or declared by its server) is refused, and
        ``expected_shape`` disagreeing raises :class:`ShapeMismatchError`. ``source`` on the result says where the
        filters came from.
        """
        local = _as_local_dir(repo_or_dir)
        if local is not None:
            files: dict[str, Path | None] = {name: local / name for name in ARTIFACT_FILES}
            labels = {name: str(local / name) for name in ARTIFACT_FILES}
            source: dict[str, Any] = {"kind": "local", "path": str(local)}
            declared: dict[str, str] = {}
            declared_by = ""
        else:
            from qfilters.resolve import locate

            located = locate(
                str(repo_or_dir),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                endpoint=endpoint,
                force_download=force_download,
            )
            files, labels, source = located.files, located.labels, located.source
            declared, declared_by = located.declared, located.declared_by
        filters = cls._load_files(files, labels, expected_shape=expected_shape, declared=declared,
                                  declared_by=declared_by)
        filters.source = source
        return filters

    @classmethod
    def _load_files(
        cls,
        files: dict[str, Path | None],
        labels: dict[str, str],
        *,
        expected_shape: tuple[int, int, int] | None,
        declared: dict[str, str] | None = None,
        declared_by: str = "its server",
    ) -> QFilters:
        """Strictly load the artifact files; ``declared``: hashes a server or registry gave for them (checked)."""
        declared = declared or {}
        raw = read_files(files, labels)
        digests = {name: _checked_digest(data, files[name], declared[name], labels[name], declared_by)  # type: ignore[arg-type]
                   for name, data in raw.items() if name in declared}
        checked = check_artifact(raw, labels, weights_sha256=digests.get(WEIGHTS_NAME), expected_shape=expected_shape)
        filters = cls._checked(checked.tensor, checked.provenance)  # float32, 3-D, finite: checked above
        filters.artifact_info = checked.info
        filters.recipe = checked.recipe
        return filters


def _checked_digest(data: bytes, path: Path, declared: str, label: str, declared_by: str) -> str | None:
    """``check_digest``, skipped for weights already hashed unchanged (see :mod:`qfilters.verified`)."""
    if path.name != WEIGHTS_NAME or len(declared) != 64:
        return check_digest(data, declared, label, declared_by)
    from qfilters import verified

    if verified.known_digest(path) == declared:
        return declared
    digest = check_digest(data, declared, label, declared_by)
    if digest is not None:
        verified.remember_digest(path, digest)
    return digest


# ---------------------------------------------------------------------- local paths


def _as_local_dir(repo_or_dir: str | os.PathLike[str]) -> Path | None:
    """The local artifact directory meant by ``repo_or_dir``, or ``None`` when it names a Hub repo."""
    path = Path(repo_or_dir).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(
                path, "is a file; pass the directory holding config.json and model.safetensors (or a Hub repo id)"
            )
        return path
    text = os.fspath(repo_or_dir)
    looks_like_path = (
        isinstance(repo_or_dir, os.PathLike)
        or text.startswith((".", "/", "~", os.sep))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
    )
    if looks_like_path:
        raise ArtifactNotFoundError(
            f"{path}: no such directory (and not a Hub repo id); check the path, or pass an 'owner/name' Hub repo id"
        )
    return None


def _carry_over_foreign_files(old: Path, new: Path) -> None:
    """Copy entries of ``old`` that are not artifact files (README.md, ...) into ``new`` before the swap."""
    for entry in old.iterdir():
        if entry.name in ARTIFACT_FILES:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


__all__ = ["QFilters", "sha256_file", "CONFIG_NAME", "WEIGHTS_NAME", "METADATA_NAME", "TENSOR_NAME", "CONFIG_KEYS",
           "ARTIFACT_FILES", "FORMAT_VERSION"]
