"""Retention: delete whole studies, files and index rows together (recycling and ``dicomnode delete``).

Like Orthanc's MaximumStorageSize, :func:`recycle` removes the studies received longest ago (by the
last instance received) until the stored size is under ``retention.max_storage_mb`` and no study is
older than ``retention.max_age_days``. Only studies whose classification is finished are candidates:
every series done, failed or skipped, no job queued or running; a study marked protected
(:func:`set_protected`) never is.

A deletion renames the study folder to ``.deleting-<StudyInstanceUID>`` (one atomic rename), deletes
the rows (patients/studies/series/instances/jobs/results, by the foreign keys' ON DELETE CASCADE) in
one commit, then removes the folder. A crash in between is finished at the next start
(:func:`dicomnode.receive.recovery.finish_deletions`): a folder whose study still has rows is renamed
back, else removed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import RetentionConfig
from dicomnode.db.models import Instance, Job, Patient, Series, Study, utcnow
from dicomnode.receive.recovery import DELETING_PREFIX
from dicomnode.receive.storage import fsync_dir, validate_uid

log = logging.getLogger("dicomnode.receive.retention")

#: Classification states after which a series may be recycled.
FINISHED = ("done", "failed", "skipped")


class StudyNotDeletable(RuntimeError):
    """The study is unknown, protected, or its classification is not finished."""


@dataclass(frozen=True)
class StudyUsage:
    study_uid: str
    last_received_at: dt.datetime
    size_bytes: int
    instances: int


def _study_usage():
    """(study id, UID, last received, bytes, instances) of every study, oldest first."""
    return (
        select(Study.id, Study.study_instance_uid, func.max(Series.last_received_at),
               func.coalesce(func.sum(Instance.size_bytes), 0), func.count(Instance.id))
        .join(Series, Series.study_fk == Study.id, isouter=True)
        .join(Instance, Instance.series_fk == Series.id, isouter=True)
        .group_by(Study.id, Study.study_instance_uid)
        .order_by(func.max(Series.last_received_at), Study.id)
    )


def _unfinished_series(study_id):
    """True when the study has a series still receiving, queued, running or unclassified."""
    return exists().where(Series.study_fk == study_id, Series.classification_state.not_in(FINISHED))


def _active_jobs(study_id):
    return exists().where(Job.series_fk == Series.id, Series.study_fk == study_id,
                          Job.state.in_(("queued", "running")))


def recyclable(session: Session, study_id: int) -> bool:
    """A study retention may delete: not protected, every series finished, no job queued or running."""
    return not session.scalar(select(Study.protected).where(Study.id == study_id)) and not session.scalar(
        select(_unfinished_series(study_id) | _active_jobs(study_id)))


def delete_study(sessions: sessionmaker[Session], storage_dir: Path, study_uid: str, reason: str,
                 force: bool = False) -> StudyUsage:
    """Delete the study's files and rows; one log line (UIDs only). Refuses (:class:`StudyNotDeletable`)
    an unknown study, and, unless ``force``, a protected or not yet classified one."""
    study_uid = validate_uid(study_uid, "StudyInstanceUID")
    with sessions() as session:
        row = session.execute(_study_usage().where(Study.study_instance_uid == study_uid)).first()
        if row is None:
            raise StudyNotDeletable(f"study {study_uid} is not in the index")
        study_id, _, last, size, count = row
        if not force and not recyclable(session, study_id):
            raise StudyNotDeletable(f"study {study_uid} is protected or its classification is not finished "
                                    "(queued, running or still receiving); --force deletes it anyway")
    folder = storage_dir / study_uid
    doomed = storage_dir / f"{DELETING_PREFIX}{study_uid}"
    if folder.exists():
        os.replace(folder, doomed)
        fsync_dir(storage_dir)
    try:
        with sessions.begin() as session:
            patient_fk = session.scalar(select(Study.patient_fk).where(Study.id == study_id))
            series_ids = select(Series.id).where(Series.study_fk == study_id).scalar_subquery()
            # Children first (slice results and region ranges go by their foreign keys' ON DELETE CASCADE).
            session.execute(delete(Job).where(Job.series_fk.in_(series_ids)))
            session.execute(delete(Instance).where(Instance.series_fk.in_(series_ids)))
            session.execute(delete(Series).where(Series.study_fk == study_id))
            session.execute(delete(Study).where(Study.id == study_id))
            session.execute(delete(Patient).where(Patient.id == patient_fk,
                                                  ~exists().where(Study.patient_fk == Patient.id)))
    except BaseException:
        if doomed.exists() and not folder.exists():
            os.replace(doomed, folder)
        raise
    shutil.rmtree(doomed, ignore_errors=True)
    usage = StudyUsage(study_uid, last, int(size), int(count))
    log.info("deleted study %s (%d instance(s), %.1f MiB, last received %s): %s", study_uid, count,
             size / (1 << 20), last.isoformat(timespec="seconds") if last else "never", reason)
    return usage


def set_protected(sessions: sessionmaker[Session], study_uid: str, protected: bool = True) -> None:
    """Mark a study protected from retention (or not); :class:`StudyNotDeletable` if it is unknown."""
    study_uid = validate_uid(study_uid, "StudyInstanceUID")
    with sessions.begin() as session:
        changed = session.execute(update(Study).where(Study.study_instance_uid == study_uid)
                                  .values(protected=protected)).rowcount
    if changed != 1:
        raise StudyNotDeletable(f"study {study_uid} is not in the index")
    log.info("study %s %s", study_uid, "protected from retention" if protected else "no longer protected")


def recycle(sessions: sessionmaker[Session], storage_dir: Path, cfg: RetentionConfig,
            now: dt.datetime | None = None) -> list[str]:
    """Delete the oldest finished, unprotected studies until the limits of ``cfg`` hold; their UIDs."""
    limit = cfg.max_storage_mb << 20 if cfg.max_storage_mb > 0 else None
    cutoff = (now or utcnow()) - dt.timedelta(days=cfg.max_age_days) if cfg.max_age_days > 0 else None
    if limit is None and cutoff is None:
        return []
    deleted: list[str] = []
    with sessions() as session:
        studies = session.execute(_study_usage()).all()
        total = sum(int(size) for _, _, _, size, _ in studies)
        candidates = [(sid, uid, last, int(size)) for sid, uid, last, size, _ in studies
                      if recyclable(session, sid)]
    for _, uid, last, size in candidates:  # oldest first
        too_old = cutoff is not None and last is not None and last < cutoff
        too_big = limit is not None and total > limit
        if not (too_old or too_big):
            break  # every later study is younger, and the size already fits
        reason = (f"older than retention.max_age_days ({cfg.max_age_days:g})" if too_old else
                  f"storage above retention.max_storage_mb ({cfg.max_storage_mb})")
        try:
            delete_study(sessions, storage_dir, uid, reason)
        except StudyNotDeletable:  # it changed since the list was read (a late instance, a new job)
            continue
        total -= size
        deleted.append(uid)
    return deleted


def start_retention(sessions: sessionmaker[Session], storage_dir: Path, cfg: RetentionConfig):
    """Start the APScheduler job that runs :func:`recycle` every ``cfg.check_interval_s``; None when off."""
    if not cfg.enabled or (cfg.max_storage_mb <= 0 and cfg.max_age_days <= 0):
        return None
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(daemon=True)

    def tick() -> None:
        try:
            recycle(sessions, storage_dir, cfg)
        except Exception:  # keep the scheduler alive; the next tick retries
            log.exception("retention check failed")

    scheduler.add_job(tick, "interval", seconds=cfg.check_interval_s, id="retention", max_instances=1,
                      coalesce=True, next_run_time=dt.datetime.now())
    scheduler.start()
    return scheduler
