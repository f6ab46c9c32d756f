"""What a process of the service holds for its lifetime, built the same way by the API and by a worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import make_engine, make_session_factory
from registry.services.resolver import FileCache
from registry.store import ArtifactStore, open_store

if TYPE_CHECKING:
    from registry.runner import JobRunner


@dataclass
class ServiceContext:
    """Settings, database engine and sessions, artifact store: all a worker needs besides its broker."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ArtifactStore

    @classmethod
    def from_settings(cls, settings: Settings, **extra: Any) -> Any:
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                             max_overflow=settings.db_max_overflow, pool_timeout=settings.db_pool_timeout)
        assert settings.artifact_dir is not None
        store = open_store(settings.artifact_url or settings.artifact_dir)
        return cls(settings, engine, make_session_factory(engine), store, **extra)


@dataclass
class RegistryState(ServiceContext):
    """The API's context: plus the job dispatcher (and the inline runner) and per-database caches."""

    runner: JobRunner | None = field(default=None)
    dispatcher: Any = field(default=None)  # registry.dispatch.Dispatcher
    # Immutable file listings of filter sets, for resolve; one per database, so it lives with the engine.
    resolve_files: FileCache = field(default_factory=FileCache)
