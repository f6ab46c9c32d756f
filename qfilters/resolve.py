"""Which files does ``QFilters.from_pretrained(id)`` load? Resolution of an id that is not a local directory.

In order, stopping at the first that has filters:

1. ``id`` is a **filter repo** on the Hub endpoint: its ``config.json`` is a Q-Filters config (a transformers config,
   with ``model_type`` / ``architectures``, means a base model). It is then loaded strictly, whatever it holds.
2. ``id`` is a **base model**: the registry named by ``QFILTERS_REGISTRY_URL`` (``GET /v1/resolve``), then a Hub
   search for repos tagged ``q-filters`` and ``base_model:<id>`` (a passing verdict first, then the newest), then the
   official ``nthngdy/<name>_qfilt`` naming that kvpress uses.

Offline (``HF_HUB_OFFLINE`` or ``local_files_only``), each step answers from what an earlier online call left in the
caches: the HF cache for repos, and small records under ``$QFILTERS_CACHE/client`` that remember which repo and commit
a base id resolved to (and the registry's files, content-addressed by sha256). When nothing matches, one
:class:`FiltersNotFoundError` lists every place tried with what it answered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfilters import hubfiles
from qfilters.artifact_format import ARTIFACT_FILES, CONFIG_NAME, REQUIRED_FILES
from qfilters.errors import ArtifactError, ArtifactNotFoundError, FiltersNotFoundError
from qfilters.fileio import atomic_write_bytes
from qfilters.offline import hf_offline
from qfilters.verified import client_dir

logger = logging.getLogger(__name__)

REGISTRY_URL_ENV = "QFILTERS_REGISTRY_URL"
REGISTRY_TOKEN_ENV = "QFILTERS_REGISTRY_TOKEN"
FILTER_TAG = "q-filters"
PASS_TAG = "qfilters-verdict:pass"
OFFICIAL_OWNER = "nthngdy"
MAX_FILE_BYTES = 1 << 30  # a filter tensor is KBs to a few MBs; anything near this is not one
HTTP_TIMEOUT_S = 30.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass
class Located:
    """The artifact files to load, how errors name them, where they came from, and the hashes declared for them
    (by the Hub's ETags or the registry's listing; the loader refuses bytes that differ)."""

    files: dict[str, Path | None]
    labels: dict[str, str]
    source: dict[str, Any] = field(default_factory=dict)
    declared: dict[str, str] = field(default_factory=dict)
    declared_by: str = "its server"


@dataclass
class _Options:
    revision: str | None
    token: str | bool | None
    cache_dir: str | os.PathLike[str] | None
    local_files_only: bool
    endpoint: str | None
    force_download: bool

    @property
    def offline(self) -> bool:
        return self.local_files_only or hf_offline()

    @property
    def hub(self) -> str:
        from huggingface_hub import constants

        return (self.endpoint or constants.ENDPOINT).rstrip("/")

    def fetch(self, repo_id: str, *, revision: str | None, cached_only: bool = False,
              config_path: Path | None = None) -> tuple[dict[str, Path | None], dict[str, str], dict[str, str]]:
        return hubfiles.fetch_artifact(
            repo_id, revision=revision, token=self.token, cache_dir=self.cache_dir,
            local_files_only=self.local_files_only or cached_only, endpoint=self.endpoint,
            force_download=self.force_download, config_path=config_path)


def locate(identifier: str, *, revision: str | None, token: str | bool | None,
           cache_dir: str | os.PathLike[str] | None, local_files_only: bool, endpoint: str | None,
           force_download: bool) -> Located:
    """Find the files for a filter repo id or a base model id (see the module docstring for the order)."""
    if not _REPO_ID_RE.fullmatch(identifier) or ".." in identifier:
        raise ArtifactNotFoundError(
            f"{identifier!r} is neither an existing local directory nor a valid repo id ('owner/name' or 'name')")
    opts = _Options(revision, token, cache_dir, local_files_only, endpoint, force_download)
    tried: list[str] = []
    errors: list[BaseException] = []
    registry = os.environ.get(REGISTRY_URL_ENV, "").strip().rstrip("/")
    if registry and urllib.parse.urlsplit(registry).scheme not in ("http", "https"):
        raise ArtifactNotFoundError(f"{REGISTRY_URL_ENV}={registry!r} is not an http(s) URL; set it to the "
                                    f"registry's base URL, such as http://127.0.0.1:8000")
    config = hubfiles.cached(identifier, CONFIG_NAME, revision=revision, cache_dir=cache_dir) if opts.offline else None
    if opts.offline and config is None and not registry:
        # Offline and not a cached repo: a base id that resolved before answers from its record straight away.
        found = _from_hub_search(identifier, opts, False, [], [])
        if found is not None:
            return found

    # 1. a filter repo
    hub_reachable = True
    try:
        if config is None:
            config = hubfiles.download(identifier, CONFIG_NAME, revision=revision, token=token, cache_dir=cache_dir,
                                       local_files_only=local_files_only, endpoint=endpoint,
                                       force_download=force_download)
    except (ArtifactError, ArtifactNotFoundError) as e:
        tried.append(f"filter repo {identifier} on {opts.hub}: {e}")
        errors.append(e)
        hub_reachable = opts.offline or not _unreachable(e.__cause__)
    else:
        if not _is_model_config(config):
            files, labels, declared = opts.fetch(identifier, revision=revision, config_path=config)
            return Located(files, labels, _hub_source("repo", identifier, opts, files), declared)
        tried.append(f"filter repo {identifier} on {opts.hub}: it is a model repo (its config.json is a "
                     f"transformers config), so it was looked up as a base model id")

    # 2a. the registry
    if registry:
        found = _from_registry(registry, identifier, opts, tried, errors)
        if found is not None:
            return found
    else:
        tried.append(f"registry: none configured (set {REGISTRY_URL_ENV} to resolve base model ids through one)")
    # 2b. Hub search by tags, then 2c. the official naming
    found = _from_hub_search(identifier, opts, hub_reachable, tried, errors)
    if found is not None:
        return found
    found = _from_official_naming(identifier, opts, hub_reachable, tried, errors)
    if found is not None:
        return found

    listing = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
    raise FiltersNotFoundError(
        f"No Q-Filters found for {identifier!r}"
        f"{f' (revision {revision!r})' if revision else ''}. Tried, in order:\n{listing}\n"
        f"Pass a filter repo id, a base model id with published filters, or a local directory.",
        tried,
    ) from (errors[0] if errors else None)


# ---------------------------------------------------------------------------------------------- Hub search


def _from_hub_search(identifier: str, opts: _Options, reachable: bool, tried: list[str],
                     errors: list[BaseException]) -> Located | None:
    where = f"Hub search on {opts.hub} (tags {FILTER_TAG!r} + 'base_model:{identifier}')"
    key = ("hub-search", opts.hub, identifier, str(opts.cache_dir or ""))
    if opts.offline or not reachable:
        record = _read_record(key)
        if record is None:
            why = "offline" if opts.offline else "the Hub is unreachable"
            tried.append(f"{where}: {why}, and no earlier search result is recorded in {client_dir()}")
            return None
        repo_id, commit = record["repo_id"], record["commit"]
        try:
            files, labels, declared = opts.fetch(repo_id, revision=opts.revision or commit, cached_only=True)
        except ArtifactNotFoundError as e:
            tried.append(f"{where}: recorded {repo_id}@{commit}, but {e}")
            errors.append(e)
            return None
        return Located(files, labels, _hub_source("hub-search", repo_id, opts, files, base_model=identifier),
                       declared)

    from huggingface_hub import HfApi

    try:
        models = list(HfApi(endpoint=opts.endpoint, token=opts.token).list_models(
            filter=[FILTER_TAG, f"base_model:{identifier}"], full=True, limit=100))
    except Exception as e:
        translated = hubfiles.translate_hub_error(
            e, repo_id=identifier, revision=None, filename="(model search)", label=where,
            local_files_only=opts.local_files_only, endpoint=opts.endpoint, cache_dir=opts.cache_dir)
        if translated is None:
            raise
        tried.append(f"{where}: {translated}")
        errors.append(translated)
        return None
    if not models:
        tried.append(f"{where}: no repo found")
        return None
    best = sorted(models, key=_preference)[0]
    verdict = next((t.split(":", 1)[1] for t in best.tags or [] if t.startswith("qfilters-verdict:")), None)
    if verdict != "pass":
        logger.warning("No Q-Filters repo for %s has a passing verdict; using %s (verdict: %s)",
                       identifier, best.id, verdict or "none")
    files, labels, declared = opts.fetch(best.id, revision=opts.revision)  # strict from here: a broken match fails
    config = files[CONFIG_NAME]
    commit = hubfiles.commit_of(config) if config else None
    if commit:
        _write_record(key, {"repo_id": best.id, "commit": commit, "verdict": verdict})
    return Located(files, labels, _hub_source("hub-search", best.id, opts, files, base_model=identifier,
                                              verdict=verdict), declared)


def _preference(model: Any) -> tuple[int, float, str]:
    """Sort key: a passing verdict first, then the newest ``last_modified``, then the id (stable across calls)."""
    passing = PASS_TAG in (model.tags or [])
    modified = model.last_modified.timestamp() if getattr(model, "last_modified", None) else float("-inf")
    return (0 if passing else 1, -modified, model.id)


def official_repo_id(identifier: str) -> str:
    """``nthngdy/<name>_qfilt``, the name kvpress's ``QFilterPress`` builds from a model id (same Llama rule)."""
    name = identifier.split("/")[-1]
    if "Meta-Llama-3.1-405B" not in name:
        name = name.replace("Meta-Llama", "Llama")
    return f"{OFFICIAL_OWNER}/{name}_qfilt"


def _from_official_naming(identifier: str, opts: _Options, reachable: bool, tried: list[str],
                          errors: list[BaseException]) -> Located | None:
    repo_id = official_repo_id(identifier)
    where = f"official naming {repo_id} on {opts.hub}"
    if repo_id == identifier:
        return None  # already tried as a filter repo
    try:
        files, labels, declared = opts.fetch(repo_id, revision=opts.revision, cached_only=not reachable)
    except ArtifactNotFoundError as e:
        tried.append(f"{where}: {e}")
        errors.append(e)
        return None
    return Located(files, labels, _hub_source("official", repo_id, opts, files, base_model=identifier), declared)


def _hub_source(kind: str, repo_id: str, opts: _Options, files: dict[str, Path | None], **extra: Any) -> dict:
    config = files.get(CONFIG_NAME)
    return {"kind": kind, "repo_id": repo_id, "endpoint": opts.hub, "revision": opts.revision,
            "commit": hubfiles.commit_of(config) if config else None, **extra}


# ---------------------------------------------------------------------------------------------- registry


def _from_registry(registry: str, identifier: str, opts: _Options, tried: list[str],
                   errors: list[BaseException]) -> Located | None:
    where = f"registry {registry}"
    key = ("registry", registry, identifier, opts.revision or "")
    answer: dict[str, Any] | None = None
    why_cached = "offline"
    if not opts.offline:
        query = {"model": identifier, **({"revision": opts.revision} if opts.revision else {})}
        try:
            answer = _registry_json(f"{registry}/v1/resolve?{urllib.parse.urlencode(query)}", registry)
        except LookupError as e:  # the registry answered: it has no filters for this model
            tried.append(f"{where}: {e}")
            return None
        except OSError as e:  # unreachable or failing: fall back to what an earlier call recorded
            why_cached = f"unreachable ({e})"
    record: dict[str, Any] | None
    if answer is not None:
        files = _registry_files(answer, registry, where)
        for name, (sha, url) in files.items():
            _fetch_blob(sha, url, registry, f"{where} {name}")
        record = {"files": {name: sha for name, (sha, _) in files.items()},
                  "filter_set": (answer.get("filter_set") or {}).get("id"),
                  "alias": answer.get("alias"), "model_revision": answer.get("revision")}
        _write_record(key, record)
    else:
        record = _read_record(key)
        if record is None:
            tried.append(f"{where}: {why_cached}, and no earlier answer is recorded in {client_dir()}")
            return None
    paths: dict[str, Path | None] = {name: None for name in ARTIFACT_FILES}
    for name, sha in record["files"].items():
        blob = _blob_path(sha)
        if not blob.is_file():
            tried.append(f"{where}: {why_cached}, and the recorded {name} (sha256 {sha}) is not in {blob.parent}")
            return None
        paths[name] = blob
    labels = {name: f"{where} {identifier}/{name}" for name in ARTIFACT_FILES}
    source = {"kind": "registry", "registry": registry, "base_model": identifier,
              "filter_set": record.get("filter_set"), "alias": record.get("alias"), "revision": opts.revision}
    return Located(paths, labels, source, dict(record["files"]), declared_by="the registry")


def _registry_files(answer: dict[str, Any], registry: str, where: str) -> dict[str, tuple[str, str]]:
    """The artifact files of a resolve answer, every field checked: name -> (sha256, absolute URL)."""
    entries = answer.get("files")
    if not isinstance(entries, list):
        raise ArtifactError(where, "answered /v1/resolve without a 'files' list; is this a qfilters registry?")
    files: dict[str, tuple[str, str]] = {}
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in ARTIFACT_FILES:
            continue  # reports and other files are not needed to load
        sha, url = entry.get("sha256"), entry.get("url")
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha) or not isinstance(url, str):
            raise ArtifactError(where, f"listed {name} without a valid sha256 and url: {entry!r}")
        url = urllib.parse.urljoin(registry + "/", url)
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ArtifactError(where, f"listed {name} at a non-HTTP URL {url!r}")
        files[name] = (sha, url)
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise ArtifactError(where, f"resolved to a filter set without {missing}; it cannot be loaded")
    return files


def _registry_json(url: str, registry: str) -> dict[str, Any]:
    """GET a registry JSON document; ``LookupError`` for 404 (with its problem detail), ``OSError`` otherwise."""
    try:
        with _open(url, registry) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as e:
        detail = _problem_detail(e)
        if e.code == 404:
            raise LookupError(f"no filters ({detail})") from e
        if e.code in (401, 403):
            raise OSError(f"HTTP {e.code} {detail}; set {REGISTRY_TOKEN_ENV} to a token with the read scope") from e
        raise OSError(f"HTTP {e.code} {detail}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise OSError(str(getattr(e, "reason", e))) from e
    try:
        data = json.loads(body)
    except ValueError as e:
        raise OSError(f"answered with something that is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise OSError("answered with JSON that is not an object")
    return data


def _open(url: str, registry: str) -> Any:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise OSError(f"refusing to open {url!r}: only http(s) URLs are fetched")
    request = urllib.request.Request(url, headers={"Accept": "application/json, */*"})  # noqa: S310 - checked above
    token = os.environ.get(REGISTRY_TOKEN_ENV)
    if token and _same_origin(url, registry):  # never hand the registry's token to another host
        request.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)  # noqa: S310 - http(s) checked above


def _same_origin(url: str, other: str) -> bool:
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(other)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _problem_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read(1 << 16) or b"{}")
    except (ValueError, OSError):
        body = {}
    detail = body.get("detail") or body.get("title") if isinstance(body, dict) else None
    return str(detail or error.reason)


def _fetch_blob(sha: str, url: str, registry: str, label: str) -> Path:
    """Download a registry file into the content-addressed cache unless present; refuse bytes of another sha256."""
    blob = _blob_path(sha)
    if blob.is_file():
        return blob
    try:
        with _open(url, registry) as response:
            data = response.read(MAX_FILE_BYTES + 1)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise ArtifactNotFoundError(f"{label}: could not download {url}: {getattr(e, 'reason', e)}") from e
    if len(data) > MAX_FILE_BYTES:
        raise ArtifactError(label, f"is larger than {MAX_FILE_BYTES} bytes; a filter artifact is far smaller")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha:
        raise ArtifactError(label, f"downloaded bytes have sha256 {actual}, the registry listed {sha}: the file was "
                                   f"corrupted or changed in transit; nothing was cached, try again")
    blob.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(blob, data, durable=False)  # content-addressed: a lost blob is fetched again
    return blob


# ---------------------------------------------------------------------------------------------- local records


def _blob_path(sha: str) -> Path:
    return client_dir() / "blobs" / sha


def _record_path(key: tuple[str, ...]) -> Path:
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return client_dir() / "resolved" / f"{digest}.json"


def _read_record(key: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        data = json.loads(_record_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == list(key) else None


def _write_record(key: tuple[str, ...], record: dict[str, Any]) -> None:
    path = _record_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"key": list(key), **record}, sort_keys=True).encode(), durable=False)


# ---------------------------------------------------------------------------------------------- helpers


def _is_model_config(path: Path) -> bool:
    """A transformers config names a model type or architecture; a Q-Filters config never does."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: load it as a filter repo, where strict loading says what is wrong
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def _unreachable(cause: BaseException | None) -> bool:
    """Whether a failed Hub call means nothing on that endpoint can be reached (rather than 'not there')."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(cause, HfHubHTTPError):
        return False  # the server answered (404, 401, ...): it is reachable
    return isinstance(cause, LocalEntryNotFoundError) or (
        isinstance(cause, Exception) and hubfiles.is_network_error(cause))


__all__ = ["Located", "locate", "official_repo_id", "REGISTRY_URL_ENV", "REGISTRY_TOKEN_ENV"]
