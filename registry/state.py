"""What the app holds for its lifetime: settings, database, artifact store, and the optional job runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import make_engine, make_session_factory
from registry.services.resolver import FileCache
from registry.store import ArtifactStore

if TYPE_CHECKING:
    from registry.runner import JobRunner


@dataclass
class RegistryState:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    runner: JobRunner | None = field(default=None)
    # Immutable file listings of filter sets, for resolve; one per database, so it lives with the engine.
    resolve_files: FileCache = field(default_factory=FileCache)

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryState:
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                             max_overflow=settings.db_max_overflow, pool_timeout=settings.db_pool_timeout)
        assert settings.artifact_dir is not None
        return cls(settings, engine, make_session_factory(engine), ArtifactStore(settings.artifact_dir))
