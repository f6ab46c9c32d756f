"""Q-Filters artifacts: the filter tensor, how it scores keys, and its on-disk / Hub format.

The format is the one kvpress's ``QFilterPress`` and the official ``nthngdy/<model>_qfilt`` Hub repositories use
(huggingface_hub ``PyTorchModelHubMixin`` layout), so filters move both ways without conversion:

* ``config.json``: exactly ``{"kv_head_dim": D, "num_kv_heads": H, "num_layers": L}`` (the mixin turns these keys
  into constructor arguments);
* ``model.safetensors``: one float32 tensor ``q_filters`` of shape ``[L, H, D]``;
* ``qfilters.json`` (ours only, ignored by the mixin): provenance plus the sha256 of ``model.safetensors``, so a
  tampered or truncated download is caught instead of silently compressing with garbage.

Sign convention: the stored filter of a KV head is ``-v1+`` (``v1+`` = first right singular vector of its queries,
oriented along them), and a key ``k`` scores ``-(f . k)`` exactly as in kvpress: higher score = key kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from qfilters.errors import ArtifactError, ArtifactNotFoundError, ShapeMismatchError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
METADATA_NAME = "qfilters.json"
TENSOR_NAME = "q_filters"
CONFIG_KEYS = ("kv_head_dim", "num_kv_heads", "num_layers")
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, METADATA_NAME)
FORMAT_VERSION = 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_IN_MEMORY = "<in-memory Q-Filters>"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (artifacts and calibration caches can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        _check_finite(filters, _IN_MEMORY)
        if provenance is not None and not isinstance(provenance, dict):
            raise ArtifactError(_IN_MEMORY, f"provenance must be a dict, got {type(provenance).__name__}")
        self.filters: torch.Tensor = filters
        self.provenance: dict[str, Any] = dict(provenance or {})
        # Bookkeeping read from qfilters.json (format/library version, sha256); empty for in-memory or third-party.
        self.artifact_info: dict[str, Any] = {}

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
    ) -> "QFilters":
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

    # ------------------------------------------------------------------ scoring
    def key_scores(self, keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Score cached keys ``[B, H_kv, T, D]`` -> ``[B, H_kv, T]``; higher = keep.

        Same expression and operation order as kvpress ``QFilterPress.score`` (``-(f * K).sum(-1)`` with the filter
        cast to the keys' dtype and device), so rankings agree with kvpress bit for bit.
        """
        if keys.dim() != 4:
            raise ShapeMismatchError(f"keys must be [batch, kv_heads, seq_len, head_dim], got {tuple(keys.shape)}")
        if not -self.num_layers <= layer_idx < self.num_layers:
            raise ShapeMismatchError(
                f"layer_idx {layer_idx} out of range: these filters cover {self.num_layers} layers"
            )
        if keys.shape[1] != self.num_kv_heads or keys.shape[3] != self.head_dim:
            raise ShapeMismatchError(
                f"keys have {keys.shape[1]} KV heads of dim {keys.shape[3]}, the filters expect "
                f"{self.num_kv_heads} heads of dim {self.head_dim}"
            )
        q_filter = self.filters[layer_idx][None, :, None].to(device=keys.device, dtype=keys.dtype)
        return -(q_filter * keys).sum(dim=-1)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write the artifact (``config.json``, ``model.safetensors``, ``qfilters.json``) and return its directory.

        Atomic: everything is written to a sibling temporary directory that then replaces ``save_directory``, so a
        failure never leaves a half-written artifact (files in an existing directory that are not artifact files,
        such as a README.md model card, are carried over). Deterministic: the same tensor gives the same bytes,
        hence the same sha256, wherever and whenever it is saved.
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
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0700
        try:
            self._write_files(tmp, provenance_json)
            if target.is_dir():
                _carry_over_foreign_files(target, tmp)
            _fsync_dir(tmp)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(target.parent)
        logger.info("Saved Q-Filters %s to %s", self.shape, target)
        return target

    def _write_files(self, directory: Path, provenance: dict[str, Any]) -> None:
        import safetensors.torch  # attribute looked up at call time so tests can simulate a failing write

        weights = directory / WEIGHTS_NAME
        # No metadata: byte-identical to what PyTorchModelHubMixin (safetensors.torch.save_model) writes.
        safetensors.torch.save_file({TENSOR_NAME: self.filters.detach().cpu().contiguous()}, str(weights))
        _fsync_file(weights)
        config = {"kv_head_dim": self.head_dim, "num_kv_heads": self.num_kv_heads, "num_layers": self.num_layers}
        # Same serialisation as PyTorchModelHubMixin.save_pretrained, so config.json is byte-identical too.
        _write_text(directory / CONFIG_NAME, json.dumps(config, sort_keys=True, indent=2))
        from qfilters import __version__

        metadata = {
            "format_version": FORMAT_VERSION,
            "library": "qfilters",
            "library_version": __version__,
            "tensor_name": TENSOR_NAME,
            "tensor_dtype": "float32",
            "tensor_shape": list(self.shape),
            "tensor_sha256": sha256_file(weights),
            **config,
            "provenance": provenance,
        }
        _write_text(directory / METADATA_NAME, json.dumps(metadata, sort_keys=True, indent=2, allow_nan=False) + "\n")

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
    ) -> "QFilters":
        """Load filters from a local directory or a Hub repo id (ours, kvpress's or the official ``_qfilt`` repos).

        Hub downloads go through huggingface_hub, so the HF cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and
        ``HF_TOKEN`` behave as everywhere else. Loading is strict because kvpress's own loader is not (it loads with
        ``strict=False`` and would keep random filters on a misnamed tensor): anything malformed raises
        :class:`ArtifactError` naming the file; ``expected_shape`` disagreeing raises :class:`ShapeMismatchError`.
        """
        local = _as_local_dir(repo_or_dir)
        if local is not None:
            files = {name: local / name for name in ARTIFACT_FILES}
            labels = {name: str(local / name) for name in ARTIFACT_FILES}
        else:
            repo_id = str(repo_or_dir)
            files, labels = _fetch_from_hub(
                repo_id,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                endpoint=endpoint,
                force_download=force_download,
            )
        return cls._load_files(files, labels, expected_shape=expected_shape)

    @classmethod
    def _load_files(
        cls,
        files: dict[str, Path | None],
        labels: dict[str, str],
        *,
        expected_shape: tuple[int, int, int] | None,
    ) -> "QFilters":
        config_path, weights_path, meta_path = files[CONFIG_NAME], files[WEIGHTS_NAME], files[METADATA_NAME]
        for name, path in ((CONFIG_NAME, config_path), (WEIGHTS_NAME, weights_path)):
            if path is None or not path.is_file():
                raise ArtifactError(
                    labels[name],
                    f"is missing; a Q-Filters artifact needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                    f"(re-save it with QFilters.save_pretrained, or check the path / repo id)",
                )
        assert config_path is not None and weights_path is not None
        config = _read_config(config_path, labels[CONFIG_NAME])
        config_shape = (config["num_layers"], config["num_kv_heads"], config["kv_head_dim"])

        info: dict[str, Any] = {}
        provenance: dict[str, Any] = {}
        if meta_path is not None and meta_path.is_file():
            info = _read_metadata(meta_path, labels[METADATA_NAME], config_shape, labels[CONFIG_NAME])
            provenance = info.pop("provenance", {})
            actual = sha256_file(weights_path)
            if actual != info["tensor_sha256"]:
                raise ArtifactError(
                    labels[WEIGHTS_NAME],
                    f"sha256 {actual} does not match tensor_sha256 {info['tensor_sha256']} recorded in "
                    f"{METADATA_NAME}: the file was modified or corrupted after saving. Re-download it "
                    f"(force_download=True) or re-save the filters.",
                )

        tensor = _read_tensor(weights_path, labels[WEIGHTS_NAME])
        if tuple(tensor.shape) != config_shape:
            raise ArtifactError(
                labels[WEIGHTS_NAME],
                f"tensor '{TENSOR_NAME}' has shape {list(tensor.shape)} but {labels[CONFIG_NAME]} declares "
                f"[num_layers, num_kv_heads, kv_head_dim] = {list(config_shape)}; the two files do not belong together",
            )
        if expected_shape is not None and tuple(expected_shape) != config_shape:
            raise ShapeMismatchError(
                f"{labels[WEIGHTS_NAME]}: filters have shape [num_layers, num_kv_heads, head_dim] = "
                f"{list(config_shape)} but {list(expected_shape)} was expected; these filters were calibrated for a "
                f"different model"
            )
        _check_finite(tensor, labels[WEIGHTS_NAME])
        filters = cls(tensor, provenance=provenance)
        filters.artifact_info = info
        return filters


# ---------------------------------------------------------------------- validation helpers

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_finite(tensor: torch.Tensor, label: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        layer, head = (int(i) for i in bad.nonzero()[0][:2])
        raise ArtifactError(
            label,
            f"contains {int(bad.sum())} non-finite value(s) (NaN/inf), first at layer {layer}, KV head {head}; "
            f"the filters are corrupted: recalibrate or re-download them",
        )


def _read_json_object(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(label, f"cannot be read as JSON ({e}); re-save or re-download the artifact") from e
    if not isinstance(data, dict):
        raise ArtifactError(label, f"must hold a JSON object, found {type(data).__name__}")
    return data


def _read_config(path: Path, label: str) -> dict[str, int]:
    data = _read_json_object(path, label)
    expected = ", ".join(f'"{k}"' for k in CONFIG_KEYS)
    missing = [k for k in CONFIG_KEYS if k not in data]
    if missing:
        raise ArtifactError(
            label, f"is missing key(s) {missing}; a Q-Filters config.json holds exactly {expected} (positive ints)"
        )
    extra = sorted(k for k in data if k not in CONFIG_KEYS)
    if extra:
        raise ArtifactError(
            label,
            f"has unexpected key(s) {extra}; a Q-Filters config.json holds exactly {expected}. Extra keys mean this "
            f"is another kind of config (a model's?) or was edited by hand; remove them if the filters are right",
        )
    for key in CONFIG_KEYS:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ArtifactError(label, f"'{key}' must be a positive int, got {value!r}")
    return {k: int(data[k]) for k in CONFIG_KEYS}


def _read_metadata(path: Path, label: str, config_shape: tuple[int, int, int], config_label: str) -> dict[str, Any]:
    info = _read_json_object(path, label)
    version = info.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(label, f"'format_version' must be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            label,
            f"was written in format_version {version}, this qfilters reads up to {FORMAT_VERSION}; upgrade qfilters",
        )
    sha = info.get("tensor_sha256")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise ArtifactError(label, f"'tensor_sha256' must be a 64-character lowercase hex digest, got {sha!r}")
    shape = info.get("tensor_shape")
    if shape is not None and list(shape) != list(config_shape):
        raise ArtifactError(
            label,
            f"records tensor_shape {shape} but {config_label} declares {list(config_shape)}; the files do not "
            f"belong together",
        )
    provenance = info.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ArtifactError(label, f"'provenance' must be a JSON object, got {type(provenance).__name__}")
    return info


def _read_tensor(path: Path, label: str) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            dtype = f.get_slice(TENSOR_NAME).get_dtype() if names == [TENSOR_NAME] else None
            tensor = f.get_tensor(TENSOR_NAME) if dtype == "F32" else None
    except (SafetensorError, OSError) as e:
        raise ArtifactError(label, f"is not a readable safetensors file ({e}); re-download or re-save it") from e
    if TENSOR_NAME not in names:
        raise ArtifactError(
            label,
            f"has no tensor named '{TENSOR_NAME}' (found {names}); kvpress and the official Q-Filters repos store "
            f"exactly one tensor '{TENSOR_NAME}'",
        )
    if names != [TENSOR_NAME]:
        extra = [n for n in names if n != TENSOR_NAME]
        raise ArtifactError(
            label,
            f"holds unexpected tensor(s) {extra} besides '{TENSOR_NAME}'; a Q-Filters artifact holds exactly one "
            f"tensor, so this is probably another kind of checkpoint",
        )
    if dtype != "F32":
        raise ArtifactError(
            label,
            f"tensor '{TENSOR_NAME}' is stored as {dtype}, the format requires F32 (float32); convert with "
            f"QFilters(tensor.float()).save_pretrained(...)",
        )
    assert tensor is not None
    if tensor.dim() != 3:
        raise ArtifactError(
            label,
            f"tensor '{TENSOR_NAME}' has rank {tensor.dim()} (shape {list(tensor.shape)}); the format requires "
            f"[num_layers, num_kv_heads, kv_head_dim]",
        )
    return tensor


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


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _carry_over_foreign_files(old: Path, new: Path) -> None:
    """Copy entries of ``old`` that are not artifact files (README.md, ...) into ``new`` before the swap."""
    for entry in old.iterdir():
        if entry.name in ARTIFACT_FILES:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` directory to ``target``, replacing any previous one; restore it on failure."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- Hub


def _fetch_from_hub(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    endpoint: str | None,
    force_download: bool,
) -> tuple[dict[str, Path | None], dict[str, str]]:
    """Download (or find in the HF cache) the artifact files of ``repo_id``; all pinned to one commit."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def label(filename: str) -> str:
        return f"hf://{repo_id}{'@' + revision if revision else ''}/{filename}"

    def download(filename: str, rev: str | None, *, optional: bool = False) -> Path | None:
        try:
            return Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=rev,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    endpoint=endpoint,
                    force_download=force_download,
                )
            )
        except Exception as e:
            # An optional file is absent if the Hub says so, or if offline and the cache does not have it (a repo
            # fetched by kvpress has no cached qfilters.json): then there is simply nothing to verify against.
            remote_absent = isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError)
            cached_absent = isinstance(e, LocalEntryNotFoundError) and (local_files_only or _hub_offline())
            if optional and (remote_absent or cached_absent):
                return None
            translated = _translate_hub_error(
                e,
                repo_id=repo_id,
                revision=revision,
                filename=filename,
                label=label(filename),
                local_files_only=local_files_only,
                endpoint=endpoint,
                cache_dir=cache_dir,
            )
            if translated is None:
                raise
            raise translated from e

    config_path = download(CONFIG_NAME, revision)
    assert config_path is not None
    # Pin the other files to the commit config.json came from, so a concurrent push cannot mix two versions.
    commit = config_path.parent.name if _COMMIT_RE.match(config_path.parent.name) else revision
    weights_path = download(WEIGHTS_NAME, commit)
    meta_path = download(METADATA_NAME, commit, optional=True)
    files: dict[str, Path | None] = {CONFIG_NAME: config_path, WEIGHTS_NAME: weights_path, METADATA_NAME: meta_path}
    return files, {name: label(name) for name in ARTIFACT_FILES}


def _hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def _translate_hub_error(
    error: Exception,
    *,
    repo_id: str,
    revision: str | None,
    filename: str,
    label: str,
    local_files_only: bool,
    endpoint: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Exception | None:
    """The one place huggingface_hub failures become qfilters errors (``None``: not a Hub failure, re-raise as is).

    Keeps the repo id and the server's own message; never includes the token.
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    def cls(name: str) -> type[BaseException]:
        return getattr(hf_errors, name, ())  # type: ignore[return-value]

    where = f"{repo_id}" + (f" (revision {revision!r})" if revision else "")
    server = " ".join(str(error).split())  # one line: the Hub's messages span several
    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    cache = cache_dir or constants.HF_HUB_CACHE

    if isinstance(error, cls("LocalEntryNotFoundError")):
        if local_files_only or _hub_offline():
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            return ArtifactNotFoundError(
                f"Q-Filters repo {where}: {filename} is not in the local Hugging Face cache ({cache}) and downloads "
                f"are disabled ({why}, offline mode). Download it once with network access, or pass a local "
                f"directory. [huggingface_hub: {server}]"
            )
        cause = error.__cause__ or error.__context__
        detail = f" Cause: {type(cause).__name__}: {cause}." if cause is not None else ""
        return ArtifactNotFoundError(
            f"Q-Filters repo {where}: could not fetch {filename} from the Hub at {hub} and it is not in the local "
            f"cache ({cache}). Check the network, HF_ENDPOINT / endpoint=, or use a local directory.{detail} "
            f"[huggingface_hub: {server}]"
        )
    if isinstance(error, cls("GatedRepoError")):
        return ArtifactNotFoundError(
            f"Q-Filters repo {where} is gated: accept its conditions on {hub}/{repo_id} and pass token= (or set "
            f"HF_TOKEN / `hf auth login`). [server: {server}]"
        )
    if isinstance(error, cls("RepositoryNotFoundError")):
        return ArtifactNotFoundError(
            f"Q-Filters repo {where} not found on {hub}: check the repo id; if it is private, pass token= (or set "
            f"HF_TOKEN). [server: {server}]"
        )
    if isinstance(error, cls("RevisionNotFoundError")):
        return ArtifactNotFoundError(
            f"Q-Filters repo {repo_id} has no revision {revision!r} on {hub}: check the branch, tag or commit. "
            f"[server: {server}]"
        )
    if isinstance(error, cls("EntryNotFoundError")):
        return ArtifactError(
            label,
            f"does not exist in repo {where}; a Q-Filters artifact needs {CONFIG_NAME} and {WEIGHTS_NAME}. "
            f"[server: {server}]",
        )
    if isinstance(error, cls("HFValidationError")):
        return ArtifactNotFoundError(
            f"{repo_id!r} is neither an existing local directory nor a valid Hub repo id ('owner/name'): {server}"
        )
    if isinstance(error, cls("OfflineModeIsEnabled")):
        return ArtifactNotFoundError(f"Q-Filters repo {where}: the Hub is unreachable in offline mode. [{server}]")
    if isinstance(error, cls("HfHubHTTPError")):
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " The token was refused: check token= / HF_TOKEN." if status in (401, 403) else ""
        return ArtifactNotFoundError(
            f"Q-Filters repo {where}: the Hub at {hub} answered HTTP {status} for {filename}.{hint} [server: {server}]"
        )
    if _is_network_error(error):
        return ArtifactNotFoundError(
            f"Q-Filters repo {where}: could not reach the Hub at {hub} for {filename} "
            f"({type(error).__name__}: {server}). Check the network and HF_ENDPOINT / endpoint=."
        )
    return None


def _is_network_error(error: Exception) -> bool:
    """Transport failures of whichever HTTP client this huggingface_hub release uses."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    for module_name, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        module = _loaded_module(module_name)
        base = getattr(module, attr, None) if module is not None else None
        if isinstance(base, type) and isinstance(error, base):
            return True
    return False


def _loaded_module(name: str) -> Any:
    import sys

    return sys.modules.get(name)


__all__ = ["QFilters", "sha256_file", "CONFIG_NAME", "WEIGHTS_NAME", "METADATA_NAME", "TENSOR_NAME"]
