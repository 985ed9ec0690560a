"""Plain functions that write the index: one instance in, patient/study/series rows upserted.

Nothing here knows about DICOM networking; the listener and the tests call these directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Job, Patient, Series, Study, utcnow
from dicomnode.headers import InstanceHeader

Outcome = Literal["new", "duplicate", "replaced"]


@dataclass(frozen=True)
class StoredFile:
    rel_path: str
    size_bytes: int
    calling_ae_title: str = ""


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def _get_or_create_patient(session: Session, h: InstanceHeader) -> Patient:
    patient = session.scalar(
        select(Patient).where(Patient.patient_id == h.patient_id, Patient.issuer_of_patient_id == h.issuer_of_patient_id)
    )
    if patient is None:
        patient = Patient(
            patient_id=h.patient_id, issuer_of_patient_id=h.issuer_of_patient_id, patient_name=h.patient_name,
            patient_birth_date=h.patient_birth_date, patient_sex=h.patient_sex,
            specific_character_set=h.specific_character_set,
        )
        session.add(patient)
        session.flush()
    return patient


def _get_or_create_study(session: Session, h: InstanceHeader) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == h.study_instance_uid))
    if study is None:
        patient = _get_or_create_patient(session, h)
        study = Study(
            patient_fk=patient.id, study_instance_uid=h.study_instance_uid, study_date=h.study_date,
            study_time=h.study_time, accession_number=h.accession_number, study_id=h.study_id,
            study_description=h.study_description, referring_physician_name=h.referring_physician_name,
            specific_character_set=h.specific_character_set,
        )
        session.add(study)
        session.flush()
    return study


def _get_or_create_series(session: Session, h: InstanceHeader) -> Series:
    series = session.scalar(select(Series).where(Series.series_instance_uid == h.series_instance_uid))
    if series is None:
        study = _get_or_create_study(session, h)
        series = Series(
            study_fk=study.id, series_instance_uid=h.series_instance_uid, modality=h.modality,
            series_number=h.series_number, series_description=h.series_description,
            body_part_examined=h.body_part_examined, specific_character_set=h.specific_character_set,
        )
        session.add(series)
        session.flush()
    return series


def _reopen(session: Session, series: Series) -> None:
    """A new instance arrived: the series is receiving again; a queued job waits for the next stable mark."""
    now = utcnow()
    series.last_received_at = now
    if series.state != "receiving":
        series.state = "receiving"
        series.stable_at = None
        session.execute(
            update(Job)
            .where(Job.series_fk == series.id, Job.state == "queued")
            .values(state="cancelled", error="series re-opened by a late instance", updated_at=now)
        )


def index_instance_once(session: Session, header: InstanceHeader, stored: StoredFile) -> Outcome:
    """Add (or replace) the instance row and upsert its parents, in the caller's transaction."""
    existing = find_instance(session, header.sop_instance_uid)
    series = _get_or_create_series(session, header)
    if existing is not None:
        existing.path = stored.rel_path
        existing.size_bytes = stored.size_bytes
        existing.transfer_syntax_uid = header.transfer_syntax_uid
        existing.received_at = utcnow()
        existing.calling_ae_title = stored.calling_ae_title
        _reopen(session, series)
        return "replaced"
    session.add(Instance(
        series_fk=series.id, sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
        instance_number=header.instance_number, transfer_syntax_uid=header.transfer_syntax_uid,
        path=stored.rel_path, size_bytes=stored.size_bytes, calling_ae_title=stored.calling_ae_title,
    ))
    _reopen(session, series)
    return "new"


def index_instance(factory: sessionmaker[Session], header: InstanceHeader, stored: StoredFile,
                   attempts: int = 5) -> Outcome:
    """Index one stored instance and commit; retried when a concurrent writer created a parent row first."""
    for attempt in range(attempts):
        session = factory()
        try:
            outcome = index_instance_once(session, header, stored)
            session.commit()
            return outcome
        except IntegrityError:
            session.rollback()
            if attempt == attempts - 1:
                raise
        finally:
            session.close()
    raise AssertionError("unreachable")


def counts(session: Session) -> dict[str, object]:
    """Counts shown by ``dicomnode status``: studies, series, instances, jobs by state, last received time."""
    jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    series_states = dict(session.execute(select(Series.state, func.count()).group_by(Series.state)).all())
    classification = dict(
        session.execute(select(Series.classification_state, func.count()).group_by(Series.classification_state)).all()
    )
    last = session.scalar(select(func.max(Instance.received_at)))
    return {
        "patients": session.scalar(select(func.count()).select_from(Patient)) or 0,
        "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
        "series": session.scalar(select(func.count()).select_from(Series)) or 0,
        "instances": session.scalar(select(func.count()).select_from(Instance)) or 0,
        "series_by_state": series_states,
        "series_by_classification": classification,
        "jobs": {state: jobs.get(state, 0) for state in ("queued", "running", "done", "failed", "skipped", "cancelled")},
        "last_received_at": last.isoformat() + "Z" if last else None,
    }
