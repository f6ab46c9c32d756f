"""Publish a filter set to a Hugging Face Hub endpoint (huggingface.co, or the registry's Hub-compatible endpoint).

One commit holds ``config.json``, ``model.safetensors``, ``qfilters.json``, the model card ``README.md`` and the
validation report under ``report/`` (JSON, HTML, Markdown and the perplexity figures); a tag names the version.
Everything goes through stock ``huggingface_hub.HfApi``, so the same code pushes to any endpoint.

Publishing is idempotent: the remote files (git blob ids, or LFS sha256) are compared with the local ones first, and
identical content makes no new commit; a version tag that already points at identical content is a no-op. So a
publisher that crashed after its upload converges on retry to the same single commit.

Errors: 401/403 become :class:`HubAuthError`, 404 :class:`HubNotFoundError` (neither is retried); 5xx, 429, timeouts
and network failures are retried with exponential backoff (bounded), then :class:`HubUnavailableError`.
Tokens come from the argument or the file named by ``QFILTERS_HUB_TOKEN_FILE`` (else huggingface_hub's own lookup)
and never reach a log line or an error message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qfilters.errors import (
    ArtifactError,
    HubAuthError,
    HubConflictError,
    HubError,
    HubNotFoundError,
    HubUnavailableError,
)

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import HfApi, ModelCard

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_FILE_ENV = "QFILTERS_HUB_TOKEN_FILE"
ARTIFACT_FILES = ("config.json", "model.safetensors", "qfilters.json")
REPORT_FILES = ("report.json", "report.html", "report.md")
REPORT_PREFIX = "report/"  # files under it belong to the publisher: stale ones are deleted by the next version
RETRY_STATUSES = frozenset({408, 412, 425, 429})  # plus every 5xx; 412: the branch moved under our parent commit


@dataclass(frozen=True)
class PublishResult:
    """Where the filters landed: the commit holding them, the repo's URL, and whether this call made the commit."""

    commit_sha: str
    repo_url: str
    created_commit: bool
    tag: str | None = None


def default_repo_id(base_model: str, organization: str) -> str:
    """The default repo naming, ``<org>/<base-model-name>-qfilters``."""
    return f"{organization}/{base_model.rstrip('/').rsplit('/', 1)[-1]}-qfilters"


def read_token_file(path: str | os.PathLike[str]) -> str:
    """A token kept in a secret file (one line); a clear error when it is missing or empty, never its content."""
    file = Path(path).expanduser()
    try:
        token = file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise HubAuthError(f"cannot read the Hub token file {file} ({e.strerror or e}); check "
                           f"{TOKEN_FILE_ENV} and the file's permissions") from None
    if not token or "\n" in token:
        raise HubAuthError(f"the Hub token file {file} must hold exactly one token on one line")
    return token


def resolve_token(token: str | bool | None) -> str | bool | None:
    """The argument if given, else the secret file named by ``QFILTERS_HUB_TOKEN_FILE``, else None (huggingface_hub's
    own lookup: ``HF_TOKEN`` or ``hf auth login``)."""
    if token is not None:
        return token
    path = os.environ.get(TOKEN_FILE_ENV)
    return read_token_file(path) if path else None


def git_blob_id(data: bytes) -> str:
    """The git object id of a regular file: what the Hub reports as a file's ``oid``/``blobId``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --------------------------------------------------------------------------------------------------- files


def collect_files(filter_set_dir: str | os.PathLike[str], repo_id: str, *, card: ModelCard | str | None = None,
                  report_dir: str | os.PathLike[str] | None = None, base_model: str | None = None,
                  license: str | None = None) -> dict[str, bytes]:
    """Every file of the commit, by repo path: the artifact, ``README.md`` and ``report/``; nothing is written."""
    directory = Path(filter_set_dir)
    files: dict[str, bytes] = {}
    for name in ARTIFACT_FILES:
        path = directory / name
        if path.is_file():
            files[name] = path.read_bytes()
    if "config.json" not in files or "model.safetensors" not in files:
        raise ArtifactError(directory, "is not a Q-Filters artifact (config.json and model.safetensors are needed); "
                                       "save filters with QFilters.save_pretrained first")
    report = None
    figures: list[tuple[str, str]] = []
    if report_dir is not None:
        from qfilters.validation.render import load_report

        rdir = Path(report_dir)
        report = load_report(rdir)
        for name in REPORT_FILES:
            if (rdir / name).is_file():
                files[REPORT_PREFIX + name] = (rdir / name).read_bytes()
        for figure_path, caption, png in _figures(report):
            files[figure_path] = png
            figures.append((figure_path, caption))
    if card is None:
        from qfilters.modelcard import build_model_card

        card = build_model_card(directory, repo_id=repo_id, report=report, base_model=base_model, license=license,
                                figures=figures)
    files["README.md"] = str(card).encode("utf-8")
    return files


def _figures(report: Any) -> list[tuple[str, str, bytes]]:
    """The perplexity-vs-budget figure of each evaluation dataset and the passkey figure when the test ran (none when
    matplotlib is not installed)."""
    try:
        from qfilters.validation import figures
    except ImportError:  # the tiny client install has no matplotlib: the card then links the HTML report only
        return []
    from qfilters.modelcard import PASSKEY_FIGURE, figure_name

    out = []
    for index, ppl in enumerate(report.perplexity):
        png = figures.perplexity_plot(ppl, report.settings.reference_budget)
        out.append((figure_name(ppl.dataset.spec, index), f"Perplexity vs KV budget on {ppl.dataset.spec}", png.data))
    if report.passkey is not None:
        out.append((PASSKEY_FIGURE, f"Passkey retrieval vs KV budget ({report.passkey.trials} needles)",
                    figures.passkey_plot(report.passkey).data))
    return out


# -------------------------------------------------------------------------------------------------- publish


def publish(filter_set_dir: str | os.PathLike[str], repo_id: str, *, card: ModelCard | str | None = None,
            report_dir: str | os.PathLike[str] | None = None, tag: str | None = None,
            token: str | bool | None = None, endpoint: str | None = None, private: bool = False,
            base_model: str | None = None, license: str | None = None, commit_message: str | None = None,
            retries: int = 4, backoff: float = 1.0, files: Mapping[str, bytes] | None = None) -> PublishResult:
    """Push the filter set in ``filter_set_dir`` (+ card and report) to ``repo_id`` as one commit, and tag it.

    ``files`` (from :func:`collect_files`) skips re-building the commit's content. Returns the commit holding the
    content, which is the existing one when nothing changed.
    """
    from huggingface_hub import HfApi

    from qfilters import __version__

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=resolve_token(token), library_name="qfilters", library_version=__version__)
    if files is None:
        if license is None and card is None:
            license = _base_license(api, base_model, filter_set_dir, report_dir)
        files = collect_files(filter_set_dir, repo_id, card=card, report_dir=report_dir, base_model=base_model,
                              license=license)
    message = commit_message or (f"Q-Filters {tag}" if tag else "Q-Filters")

    def attempt() -> PublishResult:
        return _publish_once(api, repo_id, dict(files), tag=tag, private=private, message=message)

    result = with_retries(attempt, repo_id=repo_id, endpoint=endpoint, retries=retries, backoff=backoff)
    log.info("published %s to %s/%s at commit %s (%s)", tag or "filters", endpoint, repo_id, result.commit_sha[:12],
             "new commit" if result.created_commit else "unchanged")
    return result


def _publish_once(api: HfApi, repo_id: str, files: dict[str, bytes], *, tag: str | None, private: bool,
                  message: str) -> PublishResult:
    """One idempotent pass: create the repo if missing, commit what differs, tag the commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    url = f"{api.endpoint}/{repo_id}"
    if tag:
        tagged = _tag_target(api, repo_id, tag)
        if tagged is not None:
            _, remote = _remote_files(api, repo_id, tagged)
            if not any(_diff(files, remote)):
                return PublishResult(tagged, url, False, tag)
            raise HubConflictError(f"{repo_id}: tag {tag!r} already points at commit {tagged} whose files differ from "
                                   f"these filters; publish under another version tag, or delete the tag first",
                                   repo_id=repo_id, status=409)
    head, remote = _remote_files(api, repo_id, "main")
    changed, stale = _diff(files, remote)
    created = bool(changed or stale)
    sha = head
    if created:
        operations: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=files[p]) for p in changed]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        info = api.create_commit(repo_id, operations, commit_message=message, parent_commit=head, repo_type="model")
        sha = info.oid
    if tag:
        api.create_tag(repo_id, tag=tag, revision=sha, exist_ok=True, repo_type="model")
        target = _tag_target(api, repo_id, tag)
        if target != sha:  # a concurrent publisher tagged another commit first
            raise HubConflictError(f"{repo_id}: tag {tag!r} points at commit {target}, not at {sha}",
                                   repo_id=repo_id, status=409)
    return PublishResult(sha, url, created, tag)


def _remote_files(api: HfApi, repo_id: str, revision: str) -> tuple[str, dict[str, Any]]:
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    return str(info.sha), {s.rfilename: s for s in info.siblings or []}


def _tag_target(api: HfApi, repo_id: str, tag: str) -> str | None:
    return next((t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name == tag), None)


def _diff(files: Mapping[str, bytes], remote: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(paths to upload because they are new or differ, stale report files to delete)."""
    changed = [path for path, data in files.items() if path not in remote or not _same(remote[path], data)]
    stale = [path for path in remote if path.startswith(REPORT_PREFIX) and path not in files]
    return sorted(changed), sorted(stale)


def _same(sibling: Any, data: bytes) -> bool:
    if sibling.size is not None and sibling.size != len(data):
        return False
    if sibling.lfs is not None:
        return sibling.lfs.sha256 == hashlib.sha256(data).hexdigest()
    return sibling.blob_id == git_blob_id(data)


def _base_license(api: HfApi, base_model: str | None, filter_set_dir: Any, report_dir: Any) -> str | None:
    """The base model's license from its card on the same endpoint, best effort (None when unknown)."""
    from qfilters.modelcard import KNOWN_LICENSES, read_metadata

    base = base_model or ((read_metadata(Path(filter_set_dir)).get("provenance") or {}).get("base_model") or {}) \
        .get("model_id")
    if not base or base in KNOWN_LICENSES:
        return None  # the card builder knows it
    try:
        card = api.model_info(base, timeout=10).card_data
    except Exception:  # noqa: BLE001 - absent, private, or offline: the card simply has no license
        return None
    license = getattr(card, "license", None) if card is not None else None
    return license if isinstance(license, str) else None


# --------------------------------------------------------------------------------------------------- errors


def with_retries(action: Callable[[], T], *, repo_id: str, endpoint: str, retries: int = 4,
                 backoff: float = 1.0) -> T:
    """Run ``action``; retry transient Hub failures with exponential backoff, translate the rest."""
    for attempt in range(retries + 1):
        try:
            return action()
        except HubError as e:
            error, cause = e, None
        except Exception as e:
            translated = translate_error(e, repo_id=repo_id, endpoint=endpoint)
            if translated is None:
                raise
            error, cause = translated, e
        if not error.retryable or attempt == retries:
            raise error from cause
        delay = backoff * 2 ** attempt
        log.warning("%s; retrying in %.1f s (%d of %d)", error, delay, attempt + 1, retries)
        time.sleep(delay)
    raise AssertionError("unreachable")


def translate_error(error: Exception, *, repo_id: str, endpoint: str) -> HubError | None:
    """The qfilters error for a huggingface_hub or transport failure (None: not one of those)."""
    from huggingface_hub.errors import HfHubHTTPError

    where = f"{endpoint}/{repo_id}"
    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        server = _server_message(error)
        if status in (401, 403):
            return HubAuthError(f"the Hub at {endpoint} refused the token for {repo_id} (HTTP {status}): check that "
                                f"it is valid and may write to this repo [server: {server}]",
                                repo_id=repo_id, status=status)
        if status == 404:
            return HubNotFoundError(f"{where} was not found (HTTP 404), or the token cannot see it "
                                    f"[server: {server}]", repo_id=repo_id, status=status)
        if status is not None and (status >= 500 or status in RETRY_STATUSES):
            return HubUnavailableError(f"the Hub at {endpoint} failed for {repo_id} (HTTP {status}) [server: "
                                       f"{server}]", repo_id=repo_id, status=status)
        return HubError(f"the Hub at {endpoint} refused the request for {repo_id} (HTTP {status}) [server: "
                        f"{server}]", repo_id=repo_id, status=status)
    if _is_transport_error(error):
        return HubUnavailableError(f"could not reach the Hub at {endpoint} for {repo_id} ({type(error).__name__}: "
                                   f"{' '.join(str(error).split())[:300]})", repo_id=repo_id)
    if isinstance(error, ValueError) and "README.md" in str(error):  # the endpoint's YAML validation said no
        return HubError(f"the Hub at {endpoint} refused the model card of {repo_id}: {error}", repo_id=repo_id)
    return None


def _server_message(error: Exception) -> str:
    return " ".join(str(error).split())[:500]


def _is_transport_error(error: Exception) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    import sys

    for module_name in ("httpx2", "httpx"):
        module = sys.modules.get(module_name)
        base = getattr(module, "TransportError", None) if module is not None else None
        if isinstance(base, type) and isinstance(error, base):
            return True
    requests = sys.modules.get("requests")
    base = getattr(requests, "RequestException", None) if requests is not None else None
    return isinstance(base, type) and isinstance(error, base)


__all__ = ["PublishResult", "collect_files", "default_repo_id", "publish", "read_token_file", "resolve_token",
           "with_retries", "translate_error", "git_blob_id"]
