"""What a job may read, checked before it is queued: embedded models and corpora always; Hub models and datasets
that the operator allow-lists (``QFILTERS_ALLOWED_MODELS`` / ``QFILTERS_ALLOWED_DATASETS``) or that the Hub confirms;
and how large it may be (``QFILTERS_MAX_SEQ_LEN``, ``QFILTERS_MAX_BATCH_TOKENS``), so one request cannot ask a
worker, or the API process running jobs inline, for more memory than the operator planned.

Nothing a client names is ever looked up on the server's disk: dataset specs are parsed Hub-only
(``parse_spec(..., allow_local=False)``, in the schema and again by the runner) and models load through the Hub
cache (``load_model(..., allow_local=False)``). This module adds the existence check, so a typo or an unknown id is
a 422 at submit time, after at most ``hub_timeout`` seconds, instead of a job that fails minutes later.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from registry.config import Settings
from registry.errors import Unprocessable
from registry.jobspec import JobSpec
from registry.schemas import JobCreate


def allowed(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches one of the operator's entries (exact ids or fnmatch patterns such as ``org/*``)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def check_job(settings: Settings, body: JobCreate) -> None:
    """Raise :class:`Unprocessable` unless the job fits this service's size limits and every model and dataset it
    names may be read by this service."""
    from qfilters.data.spec import HFSpec, parse_spec
    from qfilters.models import resolve_alias

    check_size(settings, body)
    if resolve_alias(body.model) is None and not allowed(body.model, settings.allowed_models):
        _confirm_on_hub("model", body.model, body.revision, settings, "QFILTERS_ALLOWED_MODELS")
    for spec in [*body.datasets, *body.eval_datasets]:
        parsed = parse_spec(spec, allow_local=False)  # the schema has parsed it the same way: this cannot fail
        if isinstance(parsed, HFSpec) and not allowed(parsed.name, settings.allowed_datasets):
            _confirm_on_hub("dataset", parsed.name, None, settings, "QFILTERS_ALLOWED_DATASETS")


def check_size(settings: Settings, body: JobCreate | JobSpec) -> None:
    """Raise :class:`Unprocessable` when a sequence or a calibration batch is larger than the operator allows (a new
    job's body, or a stored job's spec when it is retried: the limits may have been lowered since)."""
    lengths = {"seq_len": body.seq_len, "eval_seq_len": body.eval_seq_len, "passkey_context": body.passkey_context}
    for name, value in lengths.items():
        if value is not None and value > settings.max_seq_len:
            raise Unprocessable(f"{name}={value} is longer than this service allows ({settings.max_seq_len} tokens, "
                                "QFILTERS_MAX_SEQ_LEN): ask for shorter sequences or an operator for a larger limit")
    if body.batch_size * body.seq_len > settings.max_batch_tokens:
        raise Unprocessable(f"batch_size x seq_len = {body.batch_size * body.seq_len} tokens per calibration step is "
                            f"more than this service allows ({settings.max_batch_tokens}, QFILTERS_MAX_BATCH_TOKENS): "
                            "lower batch_size or seq_len")


def _confirm_on_hub(kind: str, repo_id: str, revision: str | None, settings: Settings, variable: str) -> None:
    reason = hub_problem(kind, repo_id, revision, settings.hub_timeout)
    if reason is not None:
        raise Unprocessable(f"{kind} {repo_id!r} is not available on this service: {reason}. It is neither embedded "
                            f"nor in the operator's {variable}.")


def hub_problem(kind: str, repo_id: str, revision: str | None, timeout: float) -> str | None:
    """Why the Hub does not confirm ``repo_id`` (a model or dataset repo) at ``revision``; None when it does.

    One request, bounded by ``timeout``, no retries; offline mode (``HF_HUB_OFFLINE``) answers at once.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from qfilters.offline import hf_offline

    if hf_offline(from_environment=True):
        return "the Hugging Face Hub is not consulted (offline mode)"
    try:
        HfApi().repo_info(repo_id, repo_type=kind, revision=revision, timeout=timeout)
    except GatedRepoError:
        return "it is gated on the Hugging Face Hub (this service holds no access to it)"
    except RevisionNotFoundError:
        return f"the Hugging Face Hub has no revision {revision!r} of it"
    except RepositoryNotFoundError:
        return f"the Hugging Face Hub has no {kind} of that name"
    except Exception as e:  # noqa: BLE001 - network errors of any HTTP stack: the Hub could not confirm it
        return f"the Hugging Face Hub could not be reached to confirm it ({type(e).__name__})"
    return None
