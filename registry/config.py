"""One settings object for the service, read from ``QFILTERS_*`` environment variables.

The embedded default (SQLite and a local artifact directory under the user's data dir) makes ``qfilters serve``
work with no services; production points ``QFILTERS_DATABASE_URL`` at PostgreSQL.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from platformdirs import user_data_dir
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    return Path(user_data_dir("qfilters-registry", appauthor=False))


class Settings(BaseSettings):
    """Service configuration; every field can be set as ``QFILTERS_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="QFILTERS_", extra="ignore")

    environment: str = Field("development", pattern="^(development|test|production)$")
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""  # default: sqlite file under data_dir
    artifact_dir: Path | None = None  # default: data_dir / "artifacts"
    public_reads: bool = True  # reads of published filters, reports and pages need no token
    max_request_bytes: int = 1_000_000
    # Database connections per server process; pool + overflow is also how many requests run at once in a process
    # (the rest queue): keep workers x (pool + overflow) + the runner under PostgreSQL's max_connections.
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(5, ge=0)
    db_pool_timeout: float = Field(30.0, gt=0)
    run_jobs: bool = True  # start the in-process runner with the app (qfilters serve)
    runner_poll_seconds: float = 1.0
    max_attempts: int = 3
    device: str = "cpu"  # where the in-process runner puts models
    # What jobs may name besides the embedded models and corpora, never a path on this server (see README, threat
    # model): Hub ids or fnmatch patterns ("org/*") accepted without asking the Hub (offline servers list what their
    # Hugging Face cache holds); anything else must be confirmed by the Hub at submit time, within hub_timeout.
    allowed_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_datasets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hub_timeout: float = Field(5.0, gt=0, le=60)
    base_url: str = ""  # absolute URL prefix for download locations; default: the request's own
    # Publishing: where publications are pushed ("self": this registry's own Hub-compatible endpoint, reached at
    # base_url), the token for it (a secret file, never the database or a job payload), the default organisation of
    # repo ids (<org>/<base-model-name>-qfilters), and the largest commit the Hub endpoint accepts.
    hub_endpoint: str = "https://huggingface.co"
    hub_token_file: Path | None = None
    hub_organization: str = Field("qfilters", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
    hub_max_commit_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    hub_retries: int = Field(4, ge=0, le=10)

    @field_validator("allowed_models", "allowed_datasets", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("data_dir", "artifact_dir", "hub_token_file", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        return Path(value).expanduser() if isinstance(value, str) and value else value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'registry.sqlite3'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        if self.hub_endpoint.strip() == "self" and not self.base_url:
            raise ValueError("QFILTERS_HUB_ENDPOINT=self publishes to this registry's own Hub endpoint: set "
                             "QFILTERS_BASE_URL to the URL it is reached at (e.g. http://registry.internal:8000)")
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("QFILTERS_DATABASE_URL must point at PostgreSQL in production (SQLite is the embedded default)")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
