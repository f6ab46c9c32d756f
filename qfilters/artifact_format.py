"""The artifact format's constants and its strict readers: every file is checked before a tensor is trusted.

Kept apart from :mod:`qfilters.artifact` (the ``QFilters`` class) so the Hub and registry fetchers can name the
files without the class, and each module reads in one sitting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from qfilters.errors import ArtifactError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
METADATA_NAME = "qfilters.json"
TENSOR_NAME = "q_filters"
CONFIG_KEYS = ("kv_head_dim", "num_kv_heads", "num_layers")
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, METADATA_NAME)
FORMAT_VERSION = 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (artifacts and calibration caches can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_finite(tensor: torch.Tensor, label: str) -> None:
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
    if _SHA256_RE.match(declared):
        actual, algo = hashlib.sha256(data).hexdigest(), "sha256"
    elif _SHA1_RE.match(declared):
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
