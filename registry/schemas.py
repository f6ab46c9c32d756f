"""API schemas (pydantic v2), kept apart from the ORM tables: what clients send and what they get back."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_serializer, model_validator

from registry.models import JobStatus

# Hub repo ids: "name" or "org/name", letters, digits, . _ -; no "..", no leading dot or dash, no path tricks.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,99}$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Spec kinds that read data the service is allowed to fetch; local paths would let a client read server files.
# (services/sources.py then checks hf: names against the operator's allow-list or the Hub.)
SERVICE_SPEC_KINDS = ("handbook", "austen", "bible", "jargon", "python-docs", "python-code", "fortunes", "hf")


def _check_repo_id(value: str) -> str:
    if not _REPO_ID.fullmatch(value) or ".." in value or value.endswith((".", "-")) or value.endswith(".git"):
        raise ValueError(
            f"{value!r} is not a valid model or repo id: use 'name' or 'org/name' with letters, digits, '.', '_', '-' "
            "(at most 96 characters each, no '..', no leading '.' or '-')"
        )
    return value


def _check_revision(value: str) -> str:
    if not _REVISION.fullmatch(value) or ".." in value or "//" in value:
        raise ValueError(f"{value!r} is not a valid revision: a branch, tag or commit hash such as 'main' or 'v1.0'")
    return value


def _check_alias(value: str) -> str:
    if not _ALIAS.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid alias: lowercase letters, digits, '_' and '-', e.g. 'stable'")
    return value


def _check_dataset_spec(value: str) -> str:
    from qfilters.data.spec import parse_spec
    from qfilters.errors import DatasetSpecError

    head = value.strip().partition(":")[0].lower()
    if head not in SERVICE_SPEC_KINDS:
        raise ValueError(
            f"dataset spec {value!r} is not available on the service: use one of "
            f"{', '.join(SERVICE_SPEC_KINDS)} (e.g. handbook:en, python-code, hf:NAME:SPLIT); local paths are refused"
        )
    try:  # Hub-only: never a path on the server, whatever the syntax (hf:NAME that exists locally included)
        return str(parse_spec(value, allow_local=False))
    except DatasetSpecError as e:
        raise ValueError(str(e).splitlines()[0]) from None


RepoId = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_check_repo_id)]
Revision = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_check_revision)]
AliasName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_check_alias)]
DatasetSpec = Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_check_dataset_spec)]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_serializer("*", when_used="json", check_fields=False)
    def _utc(self, value: Any) -> Any:
        # SQLite hands back naive datetimes; every timestamp the API shows is UTC with an explicit offset.
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value


# --------------------------------------------------------------------------------------------------------- jobs


class JobCreate(BaseModel):
    """A calibrate -> validate -> (publish) job. Sizes default to a few minutes for a 135M model on a CPU."""

    model_config = ConfigDict(extra="forbid")

    model: RepoId = Field(description="Hub model id (org/name) or an embedded alias such as smollm2")
    revision: Revision | None = Field(None, description="branch, tag or commit; default main")
    datasets: list[DatasetSpec] = Field(min_length=2, max_length=16,
                                        description="calibration dataset specs: at least two, stability is measured "
                                                    "across them")
    eval_datasets: list[DatasetSpec] = Field(min_length=1, max_length=8, description="evaluation dataset specs")
    tokens: int = Field(8192, ge=64, le=50_000_000, description="calibration tokens per dataset")
    seq_len: int = Field(1024, ge=16, le=131_072, description="calibration sequence length")
    batch_size: int = Field(2, ge=1, le=256)
    eval_seq_len: int = Field(1024, ge=32, le=131_072)
    score_last: int | None = Field(None, ge=1, description="tokens scored at the end of each chunk; default half")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    budgets: list[int] | None = Field(None, min_length=1, max_length=16, description="KV budgets; default L/4..L/32")
    window: int = Field(64, ge=0, le=131_072)
    max_docs: int | None = Field(6, ge=1, le=10_000)
    gates: dict[str, float] = Field(default_factory=dict, description="gate threshold overrides")
    publish_to: RepoId | None = Field(None, description="Hub repo to publish to when the verdict passes (needs "
                                                        "the publish scope)")
    force_publish: bool = Field(False, description="publish even if the verdict fails (needs the publish scope)")
    search_recipe: bool = Field(False, description="search an eviction recipe on calibration text and ship it in "
                                                   "the filters' qfilters.json (measured on the eval datasets)")
    recipe_docs: int = Field(1, ge=1, le=64, description="documents of each calibration dataset the search uses")
    passkey_trials: int = Field(0, ge=0, le=256, description="passkey retrieval trials at every budget, in the first "
                                                         "eval dataset's text (0: not run); adds the passkey gate")
    passkey_context: int | None = Field(None, ge=64, le=131_072, description="context tokens per passkey trial; "
                                                                              "default min(1024, eval_seq_len)")

    @model_validator(mode="after")
    def _consistent(self) -> JobCreate:
        from qfilters.data.spec import parse_spec
        from qfilters.models import resolve_alias
        from qfilters.validation.gates import ValidationInputError
        from qfilters.validation.run import check_settings

        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError("calibration datasets must be distinct")
        calib = [parse_spec(c, allow_local=False) for c in self.datasets]
        evaluation = {e: parse_spec(e, allow_local=False) for e in self.eval_datasets}
        shared = sorted(e for e, spec in evaluation.items() if any(spec.shares_text_with(c) for c in calib))
        if shared:  # a verdict on the text the filters were fitted to passes too easily, and a pass moves `latest`
            raise ValueError(f"evaluation datasets must be held out from calibration: {', '.join(shared)} cannot be "
                             "both (evaluate on another dataset, e.g. austen or handbook:fr)")
        if resolve_alias(self.model) and self.revision not in (None, "main"):
            raise ValueError(f"{self.model!r} is an embedded model with one revision (the packaged weights): omit "
                             f"'revision' (got {self.revision!r}), or name the Hub id to pin a Hub revision")
        try:
            check_settings(self.validation_settings())
        except ValidationInputError as e:
            raise ValueError(str(e)) from None
        return self

    def validation_settings(self) -> Any:
        """The library's :class:`ValidationSettings` for this job, through the job spec runners and workers read (one
        mapping, so what is checked at submission is what runs)."""
        from registry.jobspec import CURRENT_VERSION, JobSpec

        return JobSpec.from_row(CURRENT_VERSION, self.model_dump(mode="json")).validation_settings()


class JobProgress(BaseModel):
    phase: str | None
    tokens_done: int
    tokens_total: int
    steps_done: int
    steps_total: int
    fraction: float
    eta_seconds: float | None


class JobPublic(_Out):
    id: str
    status: JobStatus
    model: str
    revision: str
    request: dict[str, Any]
    progress: JobProgress
    error: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_by: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    filter_set_id: int | None
    links: dict[str, str]


class JobList(BaseModel):
    items: list[JobPublic]
    total: int


# ------------------------------------------------------------------------------------------ models and datasets


class ModelPublic(_Out):
    id: int
    hf_id: str
    revision: str
    commit: str | None
    model_type: str | None
    num_layers: int | None
    num_attention_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    qk_norm: bool | None
    qkv_bias: bool | None
    rope: bool | None
    sliding_window: int | None
    created_at: dt.datetime
    aliases: dict[str, int] = Field(default_factory=dict, description="alias -> filter set id")
    versions: int = 0


class ModelList(BaseModel):
    items: list[ModelPublic]
    total: int


class DatasetPublic(_Out):
    id: int
    spec: str
    sha256: str | None
    source: str | None
    documents: int | None
    tokens: int | None  # tokens the latest calibration on it used (tokenizer-dependent)
    created_at: dt.datetime


class DatasetList(BaseModel):
    items: list[DatasetPublic]
    total: int


# ---------------------------------------------------------------------------------------------------- filter sets


class FileRef(BaseModel):
    name: str
    sha256: str
    size: int
    url: str


class PublicationPublic(_Out):
    id: int
    repo_id: str
    status: str
    forced: bool
    detail: str | None
    url: str | None
    created_at: dt.datetime
    tag: str | None = None
    commit_sha: str | None = Field(None, description="the commit holding the published files, once published")


class FilterSetPublic(_Out):
    id: int
    model_id: int
    model: str
    revision: str
    version: int
    sha256: str
    shape: list[int]
    verdict: Literal["pass", "fail"]
    verdict_reasons: list[str]
    verdict_warnings: list[str]
    datasets: list[str]
    job_id: str | None
    aliases: list[str]
    created_at: dt.datetime
    files: list[FileRef]
    publications: list[PublicationPublic]
    links: dict[str, str]


class FilterSetDetail(FilterSetPublic):
    provenance: dict[str, Any]


class FilterSetList(BaseModel):
    items: list[FilterSetPublic]
    total: int


class Lineage(BaseModel):
    filter_set: FilterSetPublic
    job: JobPublic | None
    calibration_datasets: list[DatasetPublic]
    evaluation_datasets: list[DatasetPublic]
    publications: list[PublicationPublic]


class AliasMoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter_set_id: int = Field(ge=1, le=2**31 - 1)
    reason: str | None = Field(None, max_length=1000)
    force: bool = Field(False, description="point the alias at a version whose verdict failed")


class AliasPublic(_Out):
    name: str
    filter_set_id: int
    version: int
    updated_at: dt.datetime
    updated_by: str


class AliasMovePublic(_Out):
    from_filter_set_id: int | None
    to_filter_set_id: int
    moved_at: dt.datetime
    moved_by: str
    reason: str | None


class PublicationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: RepoId | None = Field(None, description="Hub repo; default <QFILTERS_HUB_ORGANIZATION>/<base model "
                                                     "name>-qfilters")
    force: bool = Field(False, description="publish even though the verdict failed")


class Resolved(BaseModel):
    """The answer to 'which filters for base model X (revision R)?'."""

    model: str
    revision: str
    alias: str
    filter_set: FilterSetPublic
    files: list[FileRef]
    report_url: str


class AuditEventPublic(_Out):
    id: int
    at: dt.datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    detail: dict[str, Any]


class AuditList(BaseModel):
    items: list[AuditEventPublic]
    total: int


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
