"""The artifact format, owned here: file names, strict readers, and the checks every artifact passes before use.

Kept apart from :mod:`qfilters.artifact` (the ``QFilters`` class) so the Hub fetcher and the registry name the files
and check an artifact with the same code, without the class. Importing it is cheap (torch loads on first check), so
the registry's web process can name the files without pulling torch in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from qfilters.errors import ArtifactError, ShapeMismatchError

#: ``qfilters.json`` key of the eviction recipe a validation chose (optional; see :class:`qfilters.recipes.RecipeBook`)
RECIPE_KEY = "recipe"

if TYPE_CHECKING:
    import torch

    from qfilters.recipes import RecipeBook

#: The files of an artifact: the kvpress / Hub layout (config, weights) plus our provenance. A ``Literal`` so that
#: an API can validate a requested file name against the format itself.
ArtifactFileName = Literal["config.json", "model.safetensors", "qfilters.json"]
ARTIFACT_FILES: tuple[str, ...] = get_args(ArtifactFileName)
CONFIG_NAME, WEIGHTS_NAME, METADATA_NAME = ARTIFACT_FILES
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # third-party artifacts (kvpress, official repos) have no qfilters.json
TENSOR_NAME = "q_filters"
CONFIG_KEYS = ("kv_head_dim", "num_kv_heads", "num_layers")
FORMAT_VERSION = 2  # the newest this library reads and writes
#: written when nothing needs a newer format, so older qfilters still load the artifact; 2 adds recipes that rank
#: layers by novelty (``novelty_layers``, or the ``novelty`` scorer), blend it in (``novelty_weight``), discount by
#: age (``recency_weight``), switch recall heads (``recall_heads``) or split budgets per KV head (``head``
#: allocation, with ``head_sensitivity``), which version-1 readers would refuse as malformed. Format 2 has not been
#: released: its fields grew within it; bump the version for any field added after a release.
BASE_FORMAT_VERSION = 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (artifacts and calibration caches can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_finite(tensor: torch.Tensor, label: str) -> None:
    """Refuse a tensor holding NaN or inf, naming the first (layer, KV head) that does."""
    import torch

    if math.isfinite(float(tensor.sum())):
        return  # any NaN or inf makes the sum non-finite (a finite sum that overflows is checked element-wise)
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        layer, head = (int(i) for i in bad.nonzero()[0][:2])
        raise ArtifactError(
            label,
            f"contains {int(bad.sum())} non-finite value(s) (NaN/inf), first at layer {layer}, KV head {head}; "
            f"the filters are corrupted: recalibrate or re-download them",
        )


def check_digest(data: bytes, declared: str, label: str, declared_by: str) -> str | None:
    """Refuse bytes whose hash differs from the one ``declared_by`` declared; returns the sha256 when computed.

    A 64-hex digest is a sha256; a 40-hex one the git blob sha1 that huggingface.co gives small files (a plain sha1
    is accepted too, for Hub-compatible servers that use one). Anything else carries no hash and is not checked.
    """
    if _SHA256_RE.fullmatch(declared):
        actual, algo = hashlib.sha256(data).hexdigest(), "sha256"
    elif _SHA1_RE.fullmatch(declared):
        actual, algo = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "git sha1"
        if actual != declared and hashlib.sha1(data).hexdigest() == declared:
            actual = declared
    else:
        return None
    if actual != declared:
        raise ArtifactError(
            label,
            f"content hash {actual} differs from the {algo} {declared} declared by {declared_by}: the file was "
            f"corrupted in transit or changed in the cache after download. Delete the cached copy and load it again "
            f"(force_download=True).",
        )
    return actual if algo == "sha256" else None


def read_bytes(path: Path, label: str) -> bytes:
    """A file's bytes; an unreadable file is an :class:`ArtifactError` naming it."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ArtifactError(label, f"cannot be read ({e})") from e


def _read_json_object(raw: bytes, label: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(label, f"cannot be read as JSON ({e}); re-save or re-download the artifact") from e
    if not isinstance(data, dict):
        raise ArtifactError(label, f"must hold a JSON object, found {type(data).__name__}")
    return data


def read_config(raw: bytes, label: str) -> dict[str, int]:
    """The three positive ints of a Q-Filters ``config.json``; any other key means it is not one (a model's?)."""
    data = _read_json_object(raw, label)
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


def read_metadata(raw: bytes, label: str, config_shape: tuple[int, int, int], config_label: str) -> dict[str, Any]:
    """``qfilters.json``: a format this library reads, a well-formed sha256, and a shape agreeing with the config."""
    info = _read_json_object(raw, label)
    version = info.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(label, f"'format_version' must be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            label,
            f"was written in format_version {version}, this qfilters reads up to {FORMAT_VERSION}; upgrade qfilters",
        )
    sha = info.get("tensor_sha256")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
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


def read_recipe(info: Mapping[str, Any], label: str, num_layers: int) -> RecipeBook | None:
    """The eviction recipe a validator stored in ``qfilters.json`` (``recipe``), checked field by field."""
    from qfilters.recipes import RecipeBook

    if info.get(RECIPE_KEY) is None:
        return None
    try:
        book = RecipeBook.from_dict(info[RECIPE_KEY])
    except (TypeError, ValueError) as e:
        raise ArtifactError(label, f"'{RECIPE_KEY}' is malformed ({e}); re-run the validation that chose it") from e
    whole = max(r.full_layers for r in book.by_budget.values())
    if whole >= num_layers:
        raise ArtifactError(label, f"'{RECIPE_KEY}' keeps {whole} layers whole but the filters have "
                                   f"{num_layers}: it does not belong to these filters")
    return book


def read_tensor(raw: bytes, label: str) -> torch.Tensor:
    """The one float32 ``q_filters`` tensor of a safetensors file's bytes; anything else is refused by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        header_len = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 or header_len > len(raw) - 8:
            raise ValueError(f"header length {header_len} exceeds the {len(raw)}-byte file")
        header = json.loads(raw[8:8 + header_len])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        names = sorted(n for n in header if n != "__metadata__")
        entry = header.get(TENSOR_NAME)
        dtype = entry.get("dtype") if isinstance(entry, dict) and names == [TENSOR_NAME] else None
        tensor = load(raw)[TENSOR_NAME] if dtype == "F32" else None
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
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


# ---------------------------------------------------------------------------------------------- whole artifacts


@dataclass(frozen=True)
class CheckedArtifact:
    """An artifact that passed every check: its files' bytes, config, ``qfilters.json`` and float32 tensor.

    ``info`` is ``qfilters.json`` without its provenance (empty for third-party artifacts, which have none).
    """

    raw: dict[str, bytes]
    config: dict[str, int]
    info: dict[str, Any]
    provenance: dict[str, Any]
    tensor: torch.Tensor
    recipe: RecipeBook | None = None  # ``qfilters.json``'s eviction recipe, parsed and checked

    @property
    def shape(self) -> tuple[int, int, int]:
        """``[num_layers, num_kv_heads, kv_head_dim]``, as the config declares and the tensor has."""
        return (self.config["num_layers"], self.config["num_kv_heads"], self.config["kv_head_dim"])


def read_files(files: Mapping[str, Path | None], labels: Mapping[str, str]) -> dict[str, bytes]:
    """Each artifact file's bytes, read once (every check works on them: no second read to race with).

    The required files must be there; ``qfilters.json`` is read when present. ``labels`` names files in errors.
    """
    for name in REQUIRED_FILES:
        path = files.get(name)
        if path is None or not path.is_file():
            raise ArtifactError(
                labels[name],
                f"is missing; a Q-Filters artifact needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(re-save it with QFilters.save_pretrained, or check the path / repo id)",
            )
    raw: dict[str, bytes] = {}
    for name in ARTIFACT_FILES:
        path = files.get(name)
        if path is not None and (name in REQUIRED_FILES or path.is_file()):
            raw[name] = read_bytes(path, labels[name])
    return raw


def check_artifact(
    raw: Mapping[str, bytes],
    labels: Mapping[str, str],
    *,
    weights_sha256: str | None = None,
    expected_shape: tuple[int, int, int] | None = None,
) -> CheckedArtifact:
    """Check an artifact's bytes as a whole: each file strictly, then that they belong together.

    ``weights_sha256``: the weights' digest if already computed (skips hashing them again). ``expected_shape``
    disagreeing with the artifact raises :class:`ShapeMismatchError` (filters for another model).
    """
    config = read_config(raw[CONFIG_NAME], labels[CONFIG_NAME])
    config_shape = (config["num_layers"], config["num_kv_heads"], config["kv_head_dim"])
    info: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    recipe = None
    if METADATA_NAME in raw:
        info = read_metadata(raw[METADATA_NAME], labels[METADATA_NAME], config_shape, labels[CONFIG_NAME])
        provenance = info.pop("provenance", {})
        recipe = read_recipe(info, labels[METADATA_NAME], config_shape[0])
        actual = weights_sha256 or hashlib.sha256(raw[WEIGHTS_NAME]).hexdigest()
        if actual != info["tensor_sha256"]:
            raise ArtifactError(
                labels[WEIGHTS_NAME],
                f"sha256 {actual} does not match tensor_sha256 {info['tensor_sha256']} recorded in "
                f"{METADATA_NAME}: the file was modified or corrupted after saving. Re-download it "
                f"(force_download=True) or re-save the filters.",
            )
    tensor = read_tensor(raw[WEIGHTS_NAME], labels[WEIGHTS_NAME])
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
    check_finite(tensor, labels[WEIGHTS_NAME])
    return CheckedArtifact(raw=dict(raw), config=config, info=info, provenance=dict(provenance),
                           tensor=tensor.contiguous(), recipe=recipe)


def read_artifact_dir(directory: str | os.PathLike[str]) -> CheckedArtifact:
    """Read and check the artifact in a local folder (as ``QFilters.from_pretrained`` would, without the class)."""
    root = Path(directory)
    files: dict[str, Path | None] = {name: root / name for name in ARTIFACT_FILES}
    labels = {name: str(root / name) for name in ARTIFACT_FILES}
    return check_artifact(read_files(files, labels), labels)
