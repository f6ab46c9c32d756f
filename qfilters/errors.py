"""All exceptions raised by qfilters.

Each one also derives from the built-in a caller would naturally catch (``ValueError``, ``FileNotFoundError``,
``RuntimeError``), so ``except ValueError`` keeps working. Messages say what is wrong *and* what to do about it.
"""

from __future__ import annotations

import os


class QFiltersError(Exception):
    """Base class for every error raised on purpose by qfilters."""


class ArtifactError(QFiltersError, ValueError):
    """A filter artifact is malformed, corrupted or does not match what it claims to be."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ArtifactNotFoundError(QFiltersError, FileNotFoundError):
    """No filter artifact at the given local path or Hub repository."""


class FiltersNotFoundError(ArtifactNotFoundError, LookupError):
    """No filters for an id after every place was tried (the filter repo, the registry, Hub search, official naming).

    ``tried`` lists each place with what it answered, in order, so the message says where to look next.
    """

    def __init__(self, message: str, tried: list[str]) -> None:
        self.tried = list(tried)
        super().__init__(message)


class DatasetSpecError(QFiltersError, ValueError):
    """A dataset spec string cannot be parsed or names an unknown source."""


class DatasetUnavailableError(QFiltersError, RuntimeError):
    """A dataset spec is valid but its content cannot be fetched here (no network, package missing, empty corpus)."""


class ModelError(QFiltersError, ValueError):
    """A model cannot be loaded, or is not a causal LM whose attention qfilters can observe."""


class ShapeMismatchError(QFiltersError, ValueError):
    """Filters and model disagree on layers, KV heads or head dimension."""


class CalibrationError(QFiltersError, RuntimeError):
    """Calibration could not produce filters (for example: no tokens reached the model)."""


class HubError(QFiltersError, RuntimeError):
    """Publishing to a Hub endpoint failed. ``retryable`` says whether trying again later can help."""

    retryable = False

    def __init__(self, message: str, *, repo_id: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.status = status


class HubAuthError(HubError, PermissionError):
    """The Hub refused the token (401/403): fix the token or its permissions; retrying will not help."""


class HubNotFoundError(HubError):
    """The Hub answered 404 for the repo or revision (or hides a private repo the token cannot see)."""


class HubConflictError(HubError):
    """The repo already holds something else under this name (e.g. the version tag points at another commit)."""


class HubUnavailableError(HubError, ConnectionError):
    """The Hub kept failing (5xx, 429, timeouts, network errors) after the bounded retries; try again later."""

    retryable = True
