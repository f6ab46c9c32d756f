"""Fetching artifact files from a Hub endpoint (huggingface.co or any Hub-compatible server) through huggingface_hub.

Downloads go through ``hf_hub_download``, so the HF cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` behave
as everywhere else. Every failure of huggingface_hub is translated in one place (:func:`translate_hub_error`) into a
qfilters error that keeps the repo id and the server's message, never the token. The hash the server declared for
each file (the HF cache names a blob after its ETag: the git sha1 of a small file, the sha256 of an LFS one) is
returned with it, and the loader checks the bytes against it, so a file changed in transit or in the cache after
download is refused. Offline, cached files are found directly (``try_to_load_from_cache``), as cheaply as possible.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from qfilters.artifact_format import ARTIFACT_FILES, CONFIG_NAME, METADATA_NAME, WEIGHTS_NAME
from qfilters.errors import ArtifactError, ArtifactNotFoundError
from qfilters.offline import hf_offline

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SAME = object()


def hub_label(repo_id: str, revision: str | None, filename: str) -> str:
    """How a Hub file is named in errors: ``hf://owner/name[@rev]/file``."""
    return f"hf://{repo_id}{'@' + revision if revision else ''}/{filename}"


def download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    endpoint: str | None,
    force_download: bool = False,
    asked_revision: str | None | object = _SAME,
) -> Path:
    """One file through ``hf_hub_download`` (cache first when offline); failures become qfilters errors.

    ``asked_revision``: the revision the caller asked for, shown in errors when ``revision`` is a commit it pinned.
    """
    from huggingface_hub import hf_hub_download

    shown = revision if asked_revision is _SAME else asked_revision
    assert shown is None or isinstance(shown, str)
    if (local_files_only or hf_offline()) and not force_download:
        from huggingface_hub import try_to_load_from_cache

        try:
            # huggingface_hub annotates cache_dir as str | Path; its docstring and os.path.join take any os.PathLike
            hit = try_to_load_from_cache(
                repo_id, filename, cache_dir=cache_dir, revision=revision)  # type: ignore[arg-type]
        except ValueError:  # an id huggingface_hub rejects: hf_hub_download below raises it, translated
            hit = _SAME
        if isinstance(hit, str):
            return Path(hit)
        if hit is None:  # not cached: say so without hf_hub_download's slower way to the same error
            from huggingface_hub.errors import LocalEntryNotFoundError

            miss = LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                           "has been disabled.")
            translated = translate_hub_error(
                miss, repo_id=repo_id, revision=shown, filename=filename, label=hub_label(repo_id, shown, filename),
                local_files_only=local_files_only, endpoint=endpoint, cache_dir=cache_dir)
            assert translated is not None
            raise translated from miss
        # known to be absent upstream: hf_hub_download below raises the error that says so

    try:
        path = Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token,
                cache_dir=cache_dir,  # type: ignore[arg-type]  # hf annotates str | Path, takes any os.PathLike
                local_files_only=local_files_only,
                endpoint=endpoint,
                force_download=force_download,
            )
        )
    except Exception as e:
        translated = translate_hub_error(
            e,
            repo_id=repo_id,
            revision=shown,
            filename=filename,
            label=hub_label(repo_id, shown, filename),
            local_files_only=local_files_only,
            endpoint=endpoint,
            cache_dir=cache_dir,
        )
        if translated is None:
            raise
        raise translated from e
    return path


def fetch_artifact(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    endpoint: str | None,
    force_download: bool = False,
    config_path: Path | None = None,
) -> tuple[dict[str, Path | None], dict[str, str], dict[str, str]]:
    """The artifact files of a filter repo (all of the commit ``config.json`` came from), their labels, and the
    hashes the server declared for them.

    ``config_path``: ``config.json`` already fetched (by the resolver deciding whether this is a filter repo).
    ``qfilters.json`` is optional (the official repos have none); the other two are required.
    """
    common: dict[str, Any] = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                                  endpoint=endpoint, force_download=force_download, asked_revision=revision)
    if config_path is None:
        config_path = download(repo_id, CONFIG_NAME, revision=revision, **common)
    # Pin the other files to the commit config.json came from, so a concurrent push cannot mix two versions.
    commit = commit_of(config_path)
    offline = (local_files_only or hf_offline()) and not force_download
    meta_path: Path | None
    if offline and commit is not None and (config_path.parent / WEIGHTS_NAME).is_file():
        # Cached snapshot: its siblings are the same commit's files; a missing qfilters.json was never fetched.
        weights_path = config_path.parent / WEIGHTS_NAME
        meta_path = config_path.parent / METADATA_NAME
        if not meta_path.is_file():
            meta_path = None
    else:
        weights_path = download(repo_id, WEIGHTS_NAME, revision=commit or revision, **common)
        try:
            meta_path = download(repo_id, METADATA_NAME, revision=commit or revision, **common)
        except (ArtifactError, ArtifactNotFoundError) as e:
            # Absent if the server says so, or if offline and the cache does not have it (a repo fetched by kvpress
            # has no cached qfilters.json): then there is simply nothing to verify against.
            if not _optional_file_absent(e.__cause__, local_files_only):
                raise
            meta_path = None
    files: dict[str, Path | None] = {CONFIG_NAME: config_path, WEIGHTS_NAME: weights_path, METADATA_NAME: meta_path}
    declared = {name: digest for name, path in files.items() if path is not None
                and (digest := served_digest(path)) is not None}
    return files, {name: hub_label(repo_id, revision, name) for name in ARTIFACT_FILES}, declared


def cached(repo_id: str, filename: str, *, revision: str | None,
           cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """The cached file, or ``None``: the offline probe that raises nothing (``download`` says why it is missing)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        # huggingface_hub annotates cache_dir as str | Path; its docstring and os.path.join take any os.PathLike
        hit = try_to_load_from_cache(
            repo_id, filename, cache_dir=cache_dir, revision=revision)  # type: ignore[arg-type]
    except ValueError:  # an id huggingface_hub rejects: download() gives the clear error
        return None
    return Path(hit) if isinstance(hit, str) else None


def commit_of(path: Path) -> str | None:
    """The commit a file fetched by huggingface_hub belongs to (its snapshot folder), if the path shows it."""
    return path.parent.name if _COMMIT_RE.fullmatch(path.parent.name) else None


def _optional_file_absent(cause: BaseException | None, local_files_only: bool) -> bool:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    remote_absent = isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError)
    cached_absent = isinstance(cause, LocalEntryNotFoundError) and (local_files_only or hf_offline())
    return remote_absent or cached_absent


def served_digest(path: Path) -> str | None:
    """The hash the server declared for a cached file: the name of the blob its snapshot link points to.

    One ``readlink``; ``None`` for caches without symlinks or names that are not hex digests (nothing to check).
    """
    try:
        name = os.path.basename(os.readlink(path))
    except OSError:
        return None
    return name if _SHA256_RE.fullmatch(name) or _COMMIT_RE.fullmatch(name) else None


def translate_hub_error(
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

    def cls(name: str) -> type[BaseException] | tuple[()]:  # () matches nothing: a class this version lacks
        return getattr(hf_errors, name, ())

    cause = error.__cause__
    if type(error) is ValueError and isinstance(cause, Exception) and "Force download failed" in str(error):
        error = cause  # force_download=True wraps the failed HEAD call's error in a bare ValueError

    where = f"{repo_id}" + (f" (revision {revision!r})" if revision else "")
    server = " ".join(str(error).split())  # one line: the Hub's messages span several
    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    cache = cache_dir or constants.HF_HUB_CACHE

    if isinstance(error, cls("LocalEntryNotFoundError")):
        if local_files_only or hf_offline():
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
    if is_network_error(error):
        return ArtifactNotFoundError(
            f"Q-Filters repo {where}: could not reach the Hub at {hub} for {filename} "
            f"({type(error).__name__}: {server}). Check the network and HF_ENDPOINT / endpoint=."
        )
    return None


def is_network_error(error: Exception) -> bool:
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



__all__ = ["download", "fetch_artifact", "served_digest", "translate_hub_error"]
