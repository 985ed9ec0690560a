"""The data behind the status page, as plain dicts: the JSON API returns them, the page renders them.

Patient names and IDs are part of what these return (the page shows them); they are never logged.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db.index import counts
from dicomnode.db.models import Instance, Job, Patient, RegionRange, Series, SliceResult, Study
from dicomnode.http.collectors import JOB_STATES

#: the classes with a probability column in slice_results (p_head, p_neck, ...; NULL where the model that
#: classified the slice has no such class), read from the model without importing torch
PROBABILITY_CLASSES = tuple(c.name[2:] for c in SliceResult.__table__.columns if c.name.startswith("p_"))


class NotFound(LookupError):
    """The request names something the index does not hold (the message says what)."""


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def summary(s: Session) -> dict[str, Any]:
    """Counts of the index and the queue by kind and state (``dicomnode status`` plus the job kinds)."""
    result = counts(s)
    queue: dict[str, dict[str, int]] = {"classify": {state: 0 for state in JOB_STATES}}
    for kind, state, n in s.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)):
        queue.setdefault(kind, {st: 0 for st in JOB_STATES})[state] = n
    result["queue"] = queue
    return result


def _series_row(series: Series, n_instances: int) -> dict[str, Any]:
    return {
        "series_instance_uid": series.series_instance_uid, "series_number": series.series_number,
        "modality": series.modality, "series_description": series.series_description,
        "n_instances": n_instances, "state": series.state,
        "classification_state": series.classification_state,
        "classification_reason": series.classification_reason,
        "body_parts": [p for p in series.body_parts.split("\\") if p], "model_version": series.model_version,
        "last_received_at": _iso(series.last_received_at), "classified_at": _iso(series.classified_at),
    }


def studies(s: Session, limit: int = 100) -> list[dict[str, Any]]:
    """The ``limit`` most recently received studies, newest first, each with its patient and series."""
    latest = (select(Series.study_fk, func.max(Series.last_received_at).label("last"))
              .group_by(Series.study_fk).subquery())
    rows = s.execute(select(Study, Patient, latest.c.last).join(Patient, Study.patient_fk == Patient.id)
                     .outerjoin(latest, latest.c.study_fk == Study.id)
                     .order_by(latest.c.last.desc(), Study.id.desc()).limit(limit)).all()
    study_ids = [study.id for study, _, _ in rows]
    per_study: dict[int, list[dict[str, Any]]] = {i: [] for i in study_ids}
    if study_ids:
        n_by_series = dict(s.execute(select(Instance.series_fk, func.count()).join(Series)
                                     .where(Series.study_fk.in_(study_ids)).group_by(Instance.series_fk)).all())
        ranges: dict[int, list[dict[str, Any]]] = {}
        for r in s.scalars(select(RegionRange).join(Series).where(Series.study_fk.in_(study_ids))
                           .order_by(RegionRange.series_fk, RegionRange.ordinal)):
            ranges.setdefault(r.series_fk, []).append({
                "region": r.region, "first_instance": r.first_instance_number,
                "last_instance": r.last_instance_number, "n_slices": r.n_slices})
        for series in s.scalars(select(Series).where(Series.study_fk.in_(study_ids))
                                .order_by(Series.series_number, Series.id)):
            row = _series_row(series, n_by_series.get(series.id, 0))
            row["regions"] = ranges.get(series.id, [])
            per_study[series.study_fk].append(row)
    return [{
        "study_instance_uid": study.study_instance_uid, "study_date": study.study_date,
        "study_description": study.study_description, "accession_number": study.accession_number,
        "patient_name": patient.patient_name, "patient_id": patient.patient_id,
        "last_received_at": _iso(last), "series": per_study[study.id],
    } for study, patient, last in rows]


def _find_series(s: Session, series_uid: str) -> Series:
    series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
    if series is None:
        raise NotFound(f"no series with SeriesInstanceUID {series_uid!r} in the index")
    return series


def series_detail(s: Session, series_uid: str) -> dict[str, Any]:
    """One series: its study and patient, its region ranges and its per-slice probabilities.

    Raises :class:`NotFound` when the index has no such series."""
    series = _find_series(s, series_uid)
    study, patient = series.study, series.study.patient
    n = s.scalar(select(func.count()).select_from(Instance).where(Instance.series_fk == series.id)) or 0
    detail = _series_row(series, n)
    detail.update({
        "study_instance_uid": study.study_instance_uid, "study_date": study.study_date,
        "study_description": study.study_description, "patient_name": patient.patient_name,
        "patient_id": patient.patient_id,
        "regions": [{
            "region": r.region, "body_part": r.body_part, "first_instance": r.first_instance_number,
            "last_instance": r.last_instance_number, "first_position": r.first_position,
            "last_position": r.last_position, "first_sop_instance_uid": r.first_sop_instance_uid,
            "last_sop_instance_uid": r.last_sop_instance_uid, "z_start_mm": r.z_start_mm, "z_end_mm": r.z_end_mm,
            "n_slices": r.n_slices, "mean_probability": round(r.mean_probability, 5),
        } for r in s.scalars(select(RegionRange).where(RegionRange.series_fk == series.id)
                             .order_by(RegionRange.ordinal))],
        "slices": [{
            "position": r.position, "sop_instance_uid": uid, "instance_number": number, "z_mm": r.z_mm,
            "probabilities": {c: getattr(r, f"p_{c}") for c in PROBABILITY_CLASSES
                              if getattr(r, f"p_{c}") is not None},
            "predicted": r.predicted, "body_parts": [p for p in r.body_parts.split("\\") if p],
        } for r, uid, number in s.execute(
            select(SliceResult, Instance.sop_instance_uid, Instance.instance_number)
            .join(Instance, SliceResult.instance_fk == Instance.id)
            .where(SliceResult.series_fk == series.id).order_by(SliceResult.position))],
    })
    return detail


def slice_files(s: Session, series_uid: str) -> list[str]:
    """Storage paths (relative) of a classified series' slices in anatomical order (for the coronal view)."""
    series = _find_series(s, series_uid)
    return list(s.scalars(select(Instance.path).join(SliceResult, SliceResult.instance_fk == Instance.id)
                          .where(SliceResult.series_fk == series.id).order_by(SliceResult.position)))


def recent_errors(s: Session, limit: int = 20) -> list[dict[str, Any]]:
    """The newest failed jobs and their errors (series by UID), newest first."""
    rows = s.execute(select(Job, Series.series_instance_uid).join(Series, Job.series_fk == Series.id)
                     .where(Job.state == "failed").order_by(Job.updated_at.desc(), Job.id.desc()).limit(limit))
    return [{"job_id": job.id, "kind": job.kind, "series_instance_uid": uid, "attempts": job.attempts,
             "error": job.error, "time": _iso(job.updated_at)} for job, uid in rows]
