"""ORM tables: the SQL metadata of the registry. API schemas live apart, in :mod:`registry.schemas`.

Lineage reads straight off the foreign keys: job -> job_datasets -> datasets, job -> filter_set -> files (blobs),
filter_set -> publications, and aliases with their audited moves.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal, get_args

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from registry.db import Base

JobStatus = Literal["queued", "running", "validating", "publishing", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
# Steps of a job run by the worker pool: waiting (for earlier steps), queued (a message is out), running, then final.
TASK_STATUSES = ("waiting", "queued", "running", "done", "failed", "cancelled")
ACTIVE_STATUSES = ("running", "validating", "publishing")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class ApiToken(Base):
    """An API token: only its sha256 is stored; ``prefix`` lets people tell tokens apart in listings."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who did what, when: one row per write."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class BaseModel_(Base):  # noqa: N801 - the trailing _ keeps it apart from pydantic.BaseModel
    """A base model at a revision, with the architecture facts that decide whether Q-Filters apply."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("hf_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hf_id: Mapped[str] = mapped_column(String(200), index=True)
    revision: Mapped[str] = mapped_column(String(100))
    commit: Mapped[str | None] = mapped_column(String(64))
    model_type: Mapped[str | None] = mapped_column(String(64), index=True)
    num_layers: Mapped[int | None] = mapped_column(Integer)
    num_attention_heads: Mapped[int | None] = mapped_column(Integer)
    num_kv_heads: Mapped[int | None] = mapped_column(Integer)
    head_dim: Mapped[int | None] = mapped_column(Integer)
    qk_norm: Mapped[bool | None] = mapped_column(Boolean)
    qkv_bias: Mapped[bool | None] = mapped_column(Boolean)
    rope: Mapped[bool | None] = mapped_column(Boolean)
    sliding_window: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    filter_sets: Mapped[list[FilterSet]] = relationship(back_populates="model", order_by="FilterSet.version")
    aliases: Mapped[list[Alias]] = relationship(back_populates="model", order_by="Alias.name")


class Dataset(Base):
    """A corpus by spec string; content hash and size are filled in once a job has read it."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[str] = mapped_column(String(300), unique=True)
    sha256: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(300))
    documents: Mapped[int | None] = mapped_column(Integer)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A calibrate -> validate -> publish job. The SQL row is the source of truth for every runner and worker."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("token_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    status: Mapped[JobStatus] = mapped_column(String(16), default="queued", index=True)
    phase: Mapped[str | None] = mapped_column(String(200))
    tokens_done: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_total: Mapped[int] = mapped_column(BigInteger, default=0)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    steps_total: Mapped[int] = mapped_column(Integer, default=0)
    fraction: Mapped[float] = mapped_column(default=0.0)  # monotone share of the whole job done, 0..1
    eta_seconds: Mapped[float | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Worker pool only: the job spec's format, the queue chosen from the model's memory needs, the last enqueue.
    spec_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    queue: Mapped[str | None] = mapped_column(String(64))
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    model: Mapped[BaseModel_] = relationship()
    token: Mapped[ApiToken] = relationship()
    datasets: Mapped[list[JobDataset]] = relationship(back_populates="job", order_by="JobDataset.position",
                                                      cascade="all, delete-orphan")
    filter_set: Mapped[FilterSet | None] = relationship(back_populates="job", uselist=False)


class JobDataset(Base):
    __tablename__ = "job_datasets"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)  # calibration | evaluation
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)

    job: Mapped[Job] = relationship(back_populates="datasets")
    dataset: Mapped[Dataset] = relationship()


class JobTask(Base):
    """One step of a job in the worker pool (calibrate one dataset, validate, publish), claimed like a job.

    Its attempts count redeliveries in SQL, so a poison step ends after ``max_attempts``; ``duplicates`` counts
    messages that arrived for a step already claimed or done (they compute nothing).
    """

    __tablename__ = "job_tasks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # calibrate | validate | publish
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # dataset index for calibrate, else 0
    spec: Mapped[str | None] = mapped_column(String(300))  # the calibration dataset
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    task_id: Mapped[str | None] = mapped_column(String(100))  # id of the last message sent, to revoke it on cancel
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    tokens_done: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_total: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float | None] = mapped_column()  # compute time of the successful attempt
    result_sha256: Mapped[str | None] = mapped_column(String(64))  # stored calibration result (artifact store)
    error: Mapped[str | None] = mapped_column(Text)


class Blob(Base):
    """A file in the content-addressed artifact store."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FilterSet(Base):
    """An immutable version of Q-Filters for one (model, revision), with its verdict and report."""

    __tablename__ = "filter_sets"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # model.safetensors
    num_layers: Mapped[int] = mapped_column(Integer)
    num_kv_heads: Mapped[int] = mapped_column(Integer)
    head_dim: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(8), index=True)  # pass | fail
    verdict_detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_specs: Mapped[list[str]] = mapped_column(JSON)
    report_json_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    report_html_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    report_md_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

    model: Mapped[BaseModel_] = relationship(back_populates="filter_sets")
    job: Mapped[Job | None] = relationship(back_populates="filter_set")
    files: Mapped[list[FilterSetFile]] = relationship(order_by="FilterSetFile.name", cascade="all, delete-orphan")
    publications: Mapped[list[Publication]] = relationship(order_by="Publication.id")


class FilterSetFile(Base):
    __tablename__ = "filter_set_files"

    filter_set_id: Mapped[int] = mapped_column(ForeignKey("filter_sets.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))

    blob: Mapped[Blob] = relationship()


class Alias(Base):
    """A named pointer (``latest``, ``stable``, ...) to one version of a model's filters; moves are audited."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    name: Mapped[str] = mapped_column(String(64))
    filter_set_id: Mapped[int] = mapped_column(ForeignKey("filter_sets.id"))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(100))

    model: Mapped[BaseModel_] = relationship(back_populates="aliases")
    filter_set: Mapped[FilterSet] = relationship()


class AliasMove(Base):
    __tablename__ = "alias_moves"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alias_id: Mapped[int] = mapped_column(ForeignKey("aliases.id", ondelete="CASCADE"), index=True)
    from_filter_set_id: Mapped[int | None] = mapped_column(ForeignKey("filter_sets.id"))
    to_filter_set_id: Mapped[int] = mapped_column(ForeignKey("filter_sets.id"))
    moved_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    moved_by: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)


class Publication(Base):
    """A request to publish a filter set to a Hub repository, and what became of it."""

    __tablename__ = "publications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filter_set_id: Mapped[int] = mapped_column(ForeignKey("filter_sets.id"), index=True)
    repo_id: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # pending | publishing | refused | published | failed
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    detail: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    endpoint: Mapped[str | None] = mapped_column(String(300))  # where it was pushed ("self": this registry)
    tag: Mapped[str | None] = mapped_column(String(100))
    commit_sha: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


# ------------------------------------------------------------------------------------- Hub-compatible endpoint


class HubRepo(Base):
    """A model repo of the registry's Hub-compatible endpoint; card fields mirror README.md at the head of main."""

    __tablename__ = "hub_repos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(200), unique=True)
    author: Mapped[str] = mapped_column(String(96), index=True)
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_modified: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    library_name: Mapped[str | None] = mapped_column(String(100))
    card_data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    tags: Mapped[list[HubRepoTag]] = relationship(order_by="HubRepoTag.position", cascade="all, delete-orphan")


class HubRepoTag(Base):
    """One tag of a repo (from its model card, as the Hub derives them); indexed for ``list_models(filter=...)``."""

    __tablename__ = "hub_repo_tags"

    repo_pk: Mapped[int] = mapped_column(ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(200), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer)


class HubCommit(Base):
    """An immutable commit; its id is the sha1 of its parent, files, message, author and time."""

    __tablename__ = "hub_commits"

    sha: Mapped[str] = mapped_column(String(40), primary_key=True)
    repo_pk: Mapped[int] = mapped_column(ForeignKey("hub_repos.id", ondelete="CASCADE"), index=True)
    parent_sha: Mapped[str | None] = mapped_column(String(40))
    title: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HubCommitFile(Base):
    """The full file listing of a commit, each file a blob of the content-addressed store."""

    __tablename__ = "hub_commit_files"

    commit_sha: Mapped[str] = mapped_column(ForeignKey("hub_commits.sha", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(500), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    git_oid: Mapped[str] = mapped_column(String(40))
    size: Mapped[int] = mapped_column(BigInteger)


class HubRef(Base):
    """A branch or a tag of a repo, pointing at a commit."""

    __tablename__ = "hub_refs"

    repo_pk: Mapped[int] = mapped_column(ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # branch | tag
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    commit_sha: Mapped[str] = mapped_column(ForeignKey("hub_commits.sha"))
    message: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
