"""One settings object for the service, read from ``QFILTERS_*`` environment variables.

The embedded default (SQLite and a local artifact directory under the user's data dir) makes ``qfilters serve``
work with no services; production points ``QFILTERS_DATABASE_URL`` at PostgreSQL.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from platformdirs import user_data_dir
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    return Path(user_data_dir("qfilters-registry", appauthor=False))


class Settings(BaseSettings):
    """Service configuration; every field can be set as ``QFILTERS_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="QFILTERS_", extra="ignore")

    environment: str = Field(default="development", pattern="^(development|test|production)$")
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""  # default: sqlite file under data_dir
    artifact_dir: Path | None = None  # default: data_dir / "artifacts"
    public_reads: bool = True  # reads of published filters, reports and pages need no token
    max_request_bytes: int = 1_000_000
    # Database connections per server process; pool + overflow is also how many requests run at once in a process
    # (the rest queue): keep workers x (pool + overflow) + the runner under PostgreSQL's max_connections.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=5, ge=0)
    db_pool_timeout: float = Field(default=30.0, gt=0)
    # Who runs jobs: ``inline`` (the embedded default: one at a time inside the API process) or ``celery`` (the
    # worker pool of ``workers/``: the API only enqueues, by task name, and sweeps).
    executor: Literal["inline", "celery"] = "inline"
    run_jobs: bool = True  # start the executor's in-process part with the app: the inline runner, or the sweeper
    runner_poll_seconds: float = 1.0
    max_attempts: int = 3
    device: str = "cpu"  # where the in-process runner (or a CPU worker) puts models
    # What jobs may name besides the embedded models and corpora, never a path on this server (see README, threat
    # model): Hub ids or fnmatch patterns ("org/*") accepted without asking the Hub (offline servers list what their
    # Hugging Face cache holds); anything else must be confirmed by the Hub at submit time, within hub_timeout.
    allowed_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_datasets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hub_timeout: float = Field(default=5.0, gt=0, le=60)
    # How large one job may be: the longest sequence it may ask for (calibration, evaluation, passkey context) and
    # batch_size x seq_len of a calibration step. Memory grows with both; raise them on hosts with the memory.
    max_seq_len: int = Field(default=32_768, ge=16)
    max_batch_tokens: int = Field(default=262_144, ge=16)
    # ---- worker pool (executor=celery)
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Queues by the memory a job's model needs, "name=GiB" comma-separated: a job goes to the smallest that fits.
    queues: str = "cpu=16"
    artifact_url: str = ""  # fsspec URL of a store shared by many hosts (s3://bucket/qfilters); default: artifact_dir
    sweep_seconds: float = Field(default=15.0, gt=0)  # how often the sweeper looks for lost messages and dead workers
    # a queued job or step not started after this is sent again
    requeue_after_seconds: float = Field(default=300.0, gt=0)
    # a running step without heartbeat for this long lost its worker
    stale_after_seconds: float = Field(default=120.0, gt=0)
    heartbeat_seconds: float = Field(default=20.0, gt=0)
    progress_seconds: float = Field(default=0.5, gt=0)  # a worker writes a calibration's progress at most this often
    task_soft_time_limit: float = Field(default=6 * 3600.0, gt=0)  # per step; the hard limit adds a grace minute
    metrics_port: int = Field(default=0, ge=0, le=65535)  # a worker's Prometheus endpoint (0: none)
    base_url: str = ""  # absolute URL prefix for download locations; default: the request's own
    # Publishing: where publications are pushed ("self": this registry's own Hub-compatible endpoint, reached at
    # base_url), the token for it (a secret file, never the database or a job payload), the default organisation of
    # repo ids (<org>/<base-model-name>-qfilters), and the largest commit the Hub endpoint accepts.
    hub_endpoint: str = "https://huggingface.co"
    hub_token_file: Path | None = None
    hub_organization: str = Field(default="qfilters", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
    hub_max_commit_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    hub_retries: int = Field(default=4, ge=0, le=10)

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
            raise ValueError("QFILTERS_DATABASE_URL must point at PostgreSQL in production "
                             "(SQLite is the embedded default)")
        return self

    @field_validator("queues")
    @classmethod
    def _check_queues(cls, value: str) -> str:
        parse_queues(value)
        return value

    @property
    def queue_capacities(self) -> dict[str, float]:
        return parse_queues(self.queues)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def parse_queues(value: str) -> dict[str, float]:
    """``"cpu=16,gpu=80,gpu-x4=320"`` -> ``{name: GiB}``; a clear error on anything else."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, gib = part.partition("=")
        try:
            capacity = float(gib)
        except ValueError:
            capacity = -1.0
        if not sep or not name.replace("-", "").replace("_", "").isalnum() or capacity <= 0:
            raise ValueError(f"QFILTERS_QUEUES entry {part!r} is not NAME=GiB, e.g. gpu=80")
        out[name] = capacity
    if not out:
        raise ValueError("QFILTERS_QUEUES names no queue; e.g. cpu=16 or gpu=80,gpu-x4=320")
    return out


@lru_cache
def get_settings() -> Settings:
    return Settings()
