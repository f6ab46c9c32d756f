"""Models, datasets, filter sets, aliases, resolution and publications."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from qfilters.artifact_format import WEIGHTS_NAME, read_artifact_dir
from qfilters.errors import ArtifactError
from registry.errors import Conflict, NotFound, Unprocessable
from registry.models import (
    Alias,
    AliasMove,
    BaseModel_,
    Blob,
    Dataset,
    FilterSet,
    FilterSetFile,
    Job,
    JobDataset,
    Publication,
    utcnow,
)
from registry.services import audit
from registry.services.query import page, where_equal
from registry.services.upsert import insert_ignore
from registry.store import ArtifactStore

AUTO_ALIAS = "latest"  # moved by the system to every new version whose verdict passes
DEFAULT_RESOLVE_ALIASES = ("stable", "latest")


# ----------------------------------------------------------------------------------------------------------- models


# A model row is made when a job names it, but the catalogue shows a model only once a runner has loaded it (and
# recorded its architecture): ids that were submitted but never loaded stay out of every listing.
_LOADED = BaseModel_.model_type.is_not(None)


def get_model(session: Session, model_id: int) -> BaseModel_:
    model = session.get(BaseModel_, model_id)
    if model is None or model.model_type is None:
        raise NotFound(f"no model with id {model_id}")
    return model


def list_models(session: Session, *, hf_id: str | None = None, model_type: str | None = None,
                limit: int = 50, offset: int = 0) -> tuple[list[BaseModel_], int]:
    query = where_equal(select(BaseModel_).where(_LOADED), (BaseModel_.hf_id, hf_id),
                        (BaseModel_.model_type, model_type))
    return page(session, query, BaseModel_.hf_id, BaseModel_.revision, limit=limit, offset=offset,
                options=(selectinload(BaseModel_.aliases),))


def version_count(session: Session, model_id: int) -> int:
    return session.scalar(select(func.count()).where(FilterSet.model_id == model_id)) or 0


def record_architecture(model: BaseModel_, info: dict[str, Any], commit: str | None) -> None:
    """Fill the model row from what loading the model told us (``qfilters.models.ModelInfo.to_dict()``)."""
    for key in ("model_type", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "qk_norm", "qkv_bias",
                "rope", "sliding_window"):
        setattr(model, key, info.get(key))
    if commit and not model.commit:
        model.commit = commit


# --------------------------------------------------------------------------------------------------------- datasets


def list_datasets(session: Session, *, limit: int = 50, offset: int = 0) -> tuple[list[Dataset], int]:
    """Datasets some job has read (content hash known); specs only ever submitted stay out, like models."""
    return page(session, select(Dataset).where(Dataset.sha256.is_not(None)), Dataset.spec, limit=limit,
                offset=offset)


def record_dataset(session: Session, spec: str, *, sha256: str, source: str, documents: int | None = None,
                   tokens: int | None = None) -> None:
    """Content hash and origin of a corpus a job read; documents and tokens are those its latest calibration used."""
    row = session.scalar(select(Dataset).where(Dataset.spec == spec))
    if row is None:
        return
    row.sha256, row.source = sha256, source
    if tokens is not None:
        row.documents, row.tokens = documents, tokens


# ------------------------------------------------------------------------------------------------------ filter sets


def get_filter_set(session: Session, filter_set_id: int) -> FilterSet:
    fs = session.get(FilterSet, filter_set_id)
    if fs is None:
        raise NotFound(f"no filter set with id {filter_set_id}")
    return fs


def search_filter_sets(session: Session, *, model: str | None = None, revision: str | None = None,
                       model_id: int | None = None, architecture: str | None = None, dataset: str | None = None,
                       verdict: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[FilterSet], int]:
    """Filter by base model (Hub id), revision, architecture (model_type), a calibration dataset spec, verdict."""
    query = where_equal(select(FilterSet).join(BaseModel_, FilterSet.model_id == BaseModel_.id),
                        (BaseModel_.hf_id, model), (BaseModel_.revision, revision), (FilterSet.model_id, model_id),
                        (BaseModel_.model_type, architecture), (FilterSet.verdict, verdict))
    if dataset:
        query = query.where(FilterSet.job_id.in_(
            select(JobDataset.job_id).join(Dataset, JobDataset.dataset_id == Dataset.id)
            .where(JobDataset.role == "calibration", Dataset.spec == dataset)
        ))
    return page(session, query, FilterSet.created_at.desc(), FilterSet.id.desc(), limit=limit, offset=offset,
                options=(selectinload(FilterSet.files).selectinload(FilterSetFile.blob),))


def aliases_of(session: Session, fs: FilterSet) -> list[str]:
    return list(session.scalars(select(Alias.name).where(Alias.filter_set_id == fs.id).order_by(Alias.name)).all())


def _put_blob(session: Session, store: ArtifactStore, data: bytes, media_type: str) -> str:
    sha, size = store.put_bytes(data)
    insert_ignore(session, Blob, {"sha256": sha, "size": size, "media_type": media_type, "created_at": utcnow()},
                  ["sha256"])
    return sha


def create_filter_set(session: Session, store: ArtifactStore, job: Job, artifact_dir: Path,
                      report_files: dict[str, bytes], report: Any) -> FilterSet:
    """Store the artifact files and report, and register the next immutable version for the job's model.

    The artifact is read and checked by the library's own format code (the bytes stored are the bytes checked), so
    the registry never holds filters that ``QFilters.from_pretrained`` would refuse.
    """
    try:
        artifact = read_artifact_dir(artifact_dir)
    except ArtifactError as e:
        raise Unprocessable(f"{artifact_dir} is not a valid filter artifact: {e}") from e
    files = {name: _put_blob(session, store, data,
                             "application/json" if name.endswith(".json") else "application/octet-stream")
             for name, data in artifact.raw.items()}
    report_json = _put_blob(session, store, report_files["json"], "application/json")
    report_html = _put_blob(session, store, report_files["html"], "text/html; charset=utf-8")
    report_md = _put_blob(session, store, report_files["md"], "text/markdown; charset=utf-8")
    num_layers, num_kv_heads, head_dim = artifact.shape
    # Versions are numbered per model; the unique constraint makes a concurrent writer fail loudly, not duplicate.
    version = (session.scalar(select(func.max(FilterSet.version)).where(FilterSet.model_id == job.model_id)) or 0) + 1
    fs = FilterSet(
        model_id=job.model_id, version=version, job_id=job.id, sha256=files[WEIGHTS_NAME],
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        verdict=report.verdict.status, verdict_detail=report.verdict.model_dump(mode="json"),
        provenance=artifact.provenance, dataset_specs=list(report.settings.calibration),
        report_json_sha256=report_json, report_html_sha256=report_html, report_md_sha256=report_md,
    )
    session.add(fs)
    session.flush()
    for name, sha in files.items():
        session.add(FilterSetFile(filter_set_id=fs.id, name=name, blob_sha256=sha))
    audit.record(session, "system", "filter_set.create", "filter_set", fs.id, job=job.id, version=version,
                 verdict=fs.verdict, sha256=fs.sha256)
    if fs.verdict == "pass":
        move_alias(session, fs.model_id, AUTO_ALIAS, fs, actor="system", reason=f"new passing version {version}")
    session.flush()
    return fs


def file_of(session: Session, fs: FilterSet, name: str) -> FilterSetFile:
    for f in fs.files:
        if f.name == name:
            return f
    raise NotFound(f"filter set {fs.id} has no file {name!r}; it has {', '.join(f.name for f in fs.files)}")


# ---------------------------------------------------------------------------------------------------------- aliases


def move_alias(session: Session, model_id: int, name: str, fs: FilterSet, *, actor: str, reason: str | None = None,
               force: bool = False) -> Alias:
    """Point ``name`` at ``fs`` (one version per alias), recording the move."""
    if fs.model_id != model_id:
        raise Unprocessable(f"filter set {fs.id} belongs to model {fs.model_id}, not model {model_id}")
    if fs.verdict != "pass" and not force:
        raise Conflict(f"filter set {fs.id} failed validation; set force=true to point {name!r} at it anyway")
    alias = session.scalar(select(Alias).where(Alias.model_id == model_id, Alias.name == name))
    previous = alias.filter_set_id if alias else None
    if alias is None:
        insert_ignore(session, Alias, {"model_id": model_id, "name": name, "filter_set_id": fs.id,
                                       "updated_at": utcnow(), "updated_by": actor}, ["model_id", "name"])
        alias = session.scalar(select(Alias).where(Alias.model_id == model_id, Alias.name == name))
        assert alias is not None
    alias.filter_set_id, alias.updated_at, alias.updated_by = fs.id, utcnow(), actor
    session.add(AliasMove(alias_id=alias.id, from_filter_set_id=previous, to_filter_set_id=fs.id, moved_by=actor,
                          reason=reason, moved_at=utcnow()))
    audit.record(session, actor, "alias.move", "model", model_id, alias=name, from_filter_set=previous,
                 to_filter_set=fs.id, forced=force and fs.verdict != "pass", reason=reason)
    session.flush()
    return alias


def get_alias(session: Session, model_id: int, name: str) -> Alias:
    alias = session.scalar(select(Alias).where(Alias.model_id == model_id, Alias.name == name))
    if alias is None:
        raise NotFound(f"model {model_id} has no alias {name!r}")
    return alias


def alias_history(session: Session, alias: Alias) -> list[AliasMove]:
    return list(session.scalars(select(AliasMove).where(AliasMove.alias_id == alias.id)
                                .order_by(AliasMove.id.desc())).all())


# ---------------------------------------------------------------------------------------------------------- resolve


def explain_unresolved(session: Session, hf_id: str, revision: str | None, alias: str | None) -> NotFound:
    """The error for a resolve miss, naming the model's known revisions or its aliases."""
    wanted = (alias,) if alias else DEFAULT_RESOLVE_ALIASES
    model = session.scalar(select(BaseModel_).where(BaseModel_.hf_id == hf_id,
                                                    BaseModel_.revision == (revision or "main")))
    if model is None:
        known = session.scalars(select(BaseModel_.revision).where(BaseModel_.hf_id == hf_id)).all()
        hint = f"; known revisions: {', '.join(known)}" if known else "; submit a calibration job for it first"
        return NotFound(f"no filters registered for model {hf_id!r} at revision {revision or 'main'!r}{hint}")
    existing = [a.name for a in model.aliases]
    return NotFound(
        f"model {hf_id!r} (revision {model.revision!r}) has no alias {' or '.join(repr(w) for w in wanted)}"
        + (f"; its aliases: {', '.join(existing)}" if existing else "; no version has passed validation yet")
    )


# ----------------------------------------------------------------------------------------------------- publications


def request_publication(session: Session, fs: FilterSet, repo_id: str, *, actor: str, force: bool,
                        **audit_detail: Any) -> Publication:
    """Record a publication request; a failing verdict is a :class:`Conflict` unless forced (as for alias moves).

    The push to the Hub itself is done by the publishing step, which picks up ``pending`` publications.
    ``audit_detail`` adds to the audit entry (a runner acting for a job names the token that asked).
    """
    if fs.verdict != "pass" and not force:
        raise Conflict(f"filter set {fs.id} failed validation ("
                       + "; ".join(fs.verdict_detail.get("reasons", [])) + "); set force=true to publish it anyway")
    pub = Publication(filter_set_id=fs.id, repo_id=repo_id, status="pending", forced=force and fs.verdict != "pass",
                      detail="waiting for the publishing step", created_at=utcnow())
    session.add(pub)
    session.flush()
    audit.record(session, actor, "publication.request", "filter_set", fs.id, repo_id=repo_id, status=pub.status,
                 forced=pub.forced, **audit_detail)
    return pub


def lineage(session: Session, fs: FilterSet) -> dict[str, Any]:
    job = fs.job
    calib: list[Dataset] = []
    evals: list[Dataset] = []
    if job is not None:
        for link in job.datasets:
            (calib if link.role == "calibration" else evals).append(link.dataset)
    return {"job": job, "calibration": calib, "evaluation": evals, "publications": list(fs.publications)}


def report_blob(fs: FilterSet, kind: str) -> str:
    return {"json": fs.report_json_sha256, "html": fs.report_html_sha256, "md": fs.report_md_sha256}[kind]

