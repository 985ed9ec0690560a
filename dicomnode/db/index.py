"""Plain functions that write the index: one instance in, patient/study/series rows upserted.

Nothing here knows about DICOM networking; the listener and the tests call these directly.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import weakref
from dataclasses import dataclass
from typing import Callable, Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Job, Patient, Series, Study, utcnow
from dicomnode.db.clock import db_utcnow
from dicomnode.receive.headers import InstanceHeader

log = logging.getLogger("dicomnode.db.index")

#: new: a row was added; replaced: an existing row now points at the new file (``replace=True``);
#: duplicate: the SOP Instance UID is already indexed and nothing was changed (``replace=False``).
Outcome = Literal["new", "duplicate", "replaced"]


@dataclass(frozen=True)
class StoredFile:
    rel_path: str
    size_bytes: int
    calling_ae_title: str = ""


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


_INSTANCES = Instance.__table__
_SERIES = Series.__table__

#: InstanceHeader text field -> (DICOM keyword, column length): the columns are sized by the VR's
#: maximum, and a peer's longer value is truncated to it (logged), so SQLite and PostgreSQL (which
#: would raise DataError) index the same value. The file keeps the value as sent.
_TEXT_COLUMNS: dict[str, tuple[str, int]] = {
    field: (keyword, column.type.length)
    for table, fields in (
        (Patient.__table__, {"patient_id": "PatientID", "issuer_of_patient_id": "IssuerOfPatientID",
                             "patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
                             "patient_sex": "PatientSex"}),
        (Study.__table__, {"study_date": "StudyDate", "study_time": "StudyTime", "accession_number": "AccessionNumber",
                           "study_id": "StudyID", "study_description": "StudyDescription",
                           "referring_physician_name": "ReferringPhysicianName",
                           "specific_character_set": "SpecificCharacterSet"}),
        (Series.__table__, {"modality": "Modality", "series_description": "SeriesDescription",
                            "body_part_examined": "BodyPartExamined"}),
    )
    for field, keyword in fields.items()
    for column in [table.c[field]]
}
#: IS values outside a 32-bit INTEGER column (IS allows 12 characters) are indexed as NULL.
_INT_RANGE = range(-(2**31), 2**31)


def fit_to_columns(h: InstanceHeader) -> InstanceHeader:
    """``h`` with every text value cut to its column's length and NUL characters removed, and numbers
    outside the INTEGER range dropped; each change is logged naming the tag and the instance (by UID).
    """
    changes: dict[str, object] = {}
    for field, (keyword, length) in _TEXT_COLUMNS.items():
        value: str = getattr(h, field)
        fixed = value.replace("\x00", "") if "\x00" in value else value
        if len(fixed) > length:
            log.warning("instance %s: %s is %d characters, longer than the index column (%d); indexed truncated "
                        "(the stored file keeps the value as sent)", h.sop_instance_uid, keyword, len(fixed), length)
            fixed = fixed[:length]
        if fixed is not value:
            changes[field] = fixed
    for field, keyword in (("series_number", "SeriesNumber"), ("instance_number", "InstanceNumber")):
        number = getattr(h, field)
        if number is not None and number not in _INT_RANGE:
            log.warning("instance %s: %s %d is out of range; indexed as empty", h.sop_instance_uid, keyword, number)
            changes[field] = None
    return dataclasses.replace(h, **changes) if changes else h


#: Study and series attributes filled from a later instance where the first left them empty (a
#: Secondary Capture without StudyDescription arriving before the CT images of the study).
_STUDY_FILLED = ("study_date", "study_time", "accession_number", "study_id", "study_description",
                 "referring_physician_name")
_SERIES_FILLED = ("modality", "series_description", "body_part_examined")


def _fill_empty(row: object, h: InstanceHeader, fields: tuple[str, ...]) -> None:
    for name in fields:
        value = getattr(h, name)
        if value and not getattr(row, name):
            setattr(row, name, value)


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
    else:
        _fill_empty(study, h, _STUDY_FILLED)
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
    else:
        _fill_empty(series, h, _SERIES_FILLED)
        if series.series_number is None and h.series_number is not None:
            series.series_number = h.series_number
        _fill_empty(series.study, h, _STUDY_FILLED)
    return series


def _reopen(session: Session, series: Series) -> None:
    """A new instance arrived: the series is receiving again; a queued job waits for the next stable mark."""
    now = utcnow()
    bind = session.get_bind()
    # the database's clock on a server database (see _FastSQL.touch)
    series.last_received_at = db_utcnow() if bind.dialect.name == "postgresql" else now
    if series.state != "receiving":
        series.state = "receiving"
        series.stable_at = None
        session.execute(
            update(Job)
            .where(Job.series_fk == series.id, Job.state == "queued")
            .values(state="cancelled", error="series re-opened by a late instance", updated_at=now)
        )


def index_instance_once(session: Session, header: InstanceHeader, stored: StoredFile,
                        replace: bool = True) -> Outcome:
    """Add (or, with ``replace``, replace) the instance row and upsert its parents, in the caller's
    transaction. An indexed instance with ``replace=False`` is left alone: "duplicate", nothing written."""
    header = fit_to_columns(header)
    existing = find_instance(session, header.sop_instance_uid)
    if existing is not None and not replace:
        return "duplicate"
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
                   attempts: int = 5, before_commit: Callable[[], object] | None = None,
                   replace: bool = True) -> Outcome:
    """Index one stored instance and commit; retried when a concurrent writer created a row first.

    ``before_commit`` (e.g. the rename of the instance's file into place) runs after the rows are
    written and before the commit; if it raises, the transaction is rolled back. With ``replace=False``
    an instance already indexed (also one a concurrent writer committed first: the unique index makes
    the check and the insert one step) returns "duplicate" without calling ``before_commit``.
    """
    for attempt in range(attempts):
        session = factory()
        try:
            outcome = index_instance_once(session, header, stored, replace=replace)
            if outcome == "duplicate":
                session.rollback()
                return outcome
            if before_commit is not None:
                session.flush()
                before_commit()
            session.commit()
            return outcome
        except IntegrityError:
            session.rollback()
            if attempt == attempts - 1:
                raise
        finally:
            session.close()
    raise AssertionError("unreachable")


class _FastSQL:
    """The three statements of the per-instance path as driver SQL, for one engine's dialect.

    SQLAlchemy Core costs ~250 us per instance here (connection checkout, compile-cache lookups,
    result objects) against ~70 us for the same statements on the driver's connection, taken from the
    same pool. The statements are plain SQL that SQLite and PostgreSQL both accept; parameters are
    named (``:name`` for sqlite3, ``%(name)s`` for the pyformat drivers) and datetimes go through the
    column type's own bind processor, so rows are stored exactly as the ORM stores them.
    """

    def __init__(self, engine) -> None:
        dialect = engine.dialect
        p = (lambda n: f"%({n})s") if dialect.paramstyle in ("pyformat", "format") else (lambda n: f":{n}")
        cols = ("series_fk", "sop_instance_uid", "sop_class_uid", "instance_number", "transfer_syntax_uid",
                "path", "size_bytes", "received_at", "calling_ae_title")
        self.exists = f"SELECT 1 FROM instances WHERE sop_instance_uid = {p('uid')} LIMIT 1"
        # On a server database the quiet time is measured on the database's clock (as the completeness
        # checks of dicomnode.queue.stability do), so machines with skewed clocks agree; an SQLite file
        # is local, and its clock is this machine's.
        now = "timezone('utc', statement_timestamp())" if dialect.name == "postgresql" else p("now")
        self.touch = (f"UPDATE series SET last_received_at = {now} "
                      f"WHERE id = {p('series_id')} AND state = 'receiving'")
        self.insert = (f"INSERT INTO instances ({', '.join(cols)}) "
                       f"VALUES ({', '.join(p(c) for c in cols)})")
        process = _INSTANCES.c.received_at.type.dialect_impl(dialect).bind_processor(dialect)
        self.datetime = process or (lambda value: value)
        self.integrity_error = dialect.dbapi.IntegrityError


_FAST_SQL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its _FastSQL


def _fast_sql(engine) -> _FastSQL:
    fast = _FAST_SQL.get(engine)
    if fast is None:
        fast = _FAST_SQL[engine] = _FastSQL(engine)
    return fast


def _engine(factory: sessionmaker[Session]):
    return factory.kw["bind"]


def instance_exists(factory: sessionmaker[Session], sop_instance_uid: str) -> bool:
    """True if the index holds ``sop_instance_uid`` (one indexed lookup on a pooled driver connection)."""
    engine = _engine(factory)
    sql = _fast_sql(engine)
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        try:
            cur.execute(sql.exists, {"uid": sop_instance_uid})
            return cur.fetchone() is not None
        finally:
            cur.close()
    finally:
        conn.close()  # back to the pool (which rolls the read transaction back)


def _index_known_series(factory: sessionmaker[Session], series_id: int, header: InstanceHeader,
                        stored: StoredFile, before_commit: Callable[[], object] | None) -> bool:
    """Touch the series and insert the instance in one transaction; False (rolled back) where the
    full path must decide: the series is no longer 'receiving', or the insert conflicts."""
    engine = _engine(factory)
    sql = _fast_sql(engine)
    now = sql.datetime(utcnow())
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        try:
            driver = conn.driver_connection
            if isinstance(driver, sqlite3.Connection) and driver.isolation_level is None:
                cur.execute("BEGIN")  # autocommit mode: the two statements must still be one transaction
            cur.execute(sql.touch, {"series_id": series_id, "now": now})
            if cur.rowcount != 1:
                conn.rollback()
                return False
            cur.execute(sql.insert, {
                "series_fk": series_id, "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid, "instance_number": header.instance_number,
                "transfer_syntax_uid": header.transfer_syntax_uid, "path": stored.rel_path,
                "size_bytes": stored.size_bytes, "received_at": now, "calling_ae_title": stored.calling_ae_title,
            })
            if before_commit is not None:
                before_commit()
            conn.commit()
            return True
        except sql.integrity_error:
            conn.rollback()
            return False
        except BaseException:
            conn.rollback()
            raise
        finally:
            cur.close()
    finally:
        conn.close()


def index_instance_cached(factory: sessionmaker[Session], header: InstanceHeader, stored: StoredFile,
                          series_ids: dict[str, int], before_commit: Callable[[], object] | None = None,
                          replace: bool = True) -> Outcome:
    """:func:`index_instance` with the series row id cached per process: two statements, one commit.

    With the series known (``series_ids`` maps SeriesInstanceUID to its row id, filled here), a new
    instance costs an UPDATE of the series' ``last_received_at`` (only while it is 'receiving') and an
    INSERT of the instance row, in one transaction. Anything else (a series not seen yet by this process,
    a series marked stable meanwhile, a duplicate or replaced instance, a series deleted under us) takes
    the full ORM path of :func:`index_instance`, which is what defines the behaviour.
    ``before_commit``, ``replace``: as for :func:`index_instance` (the fast path's INSERT fails on the
    unique SOP Instance UID, so a duplicate always reaches the full path, which decides).
    """
    header = fit_to_columns(header)
    series_uid = header.series_instance_uid
    series_id = series_ids.get(series_uid)
    if series_id is not None and _index_known_series(factory, series_id, header, stored, before_commit):
        return "new"
    outcome = index_instance(factory, header, stored, before_commit=before_commit, replace=replace)
    with factory() as session:
        found = session.scalar(select(Series.id).where(Series.series_instance_uid == series_uid))
    if found is not None:
        if len(series_ids) >= 4096:  # a bounded cache: forget the oldest half
            for key in list(series_ids)[:2048]:
                del series_ids[key]
        series_ids[series_uid] = found
    return outcome


def counts(session: Session) -> dict[str, object]:
    """Counts shown by ``dicomnode status``: studies, series, instances, jobs by state, last received time."""
    jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    by_kind: dict[str, dict[str, int]] = {}  # issue 14: classify, results, forward
    for kind, state, n in session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)):
        by_kind.setdefault(kind, {})[state] = n
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
        "jobs_by_kind": by_kind,
        "last_received_at": last.isoformat() + "Z" if last else None,
    }
