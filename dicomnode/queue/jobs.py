"""The durable job queue: rows in ``jobs``, claimed with a lease, retried with backoff, failed after N.

Claiming is a compare-and-set UPDATE, so any number of workers on SQLite or PostgreSQL (one machine
or several) can share the queue: each job runs on one worker at a time, and a worker that dies leaves
its job to be claimed again once the lease has expired.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job, Series, utcnow

log = logging.getLogger("dicomnode.queue.jobs")


def enqueue_classification(session: Session, series: Series) -> Job:
    """Queue a classification job for ``series`` unless one is already queued; returns the queued job."""
    job = session.scalar(select(Job).where(Job.series_fk == series.id, Job.state == "queued", Job.kind == "classify"))
    if job is None:
        job = Job(kind="classify", series_fk=series.id, state="queued")
        session.add(job)
    series.classification_state = "queued"
    series.classification_reason = ""
    session.flush()
    return job


def claim_next(sessions: sessionmaker[Session], owner: str, lease_s: float, kind: str = "classify") -> Job | None:
    """Claim the oldest runnable job (queued and due, or running with an expired lease); None if none."""
    now = utcnow()
    runnable = or_(
        and_(Job.state == "queued", Job.not_before <= now),
        and_(Job.state == "running", Job.lease_expires_at < now),
    )
    with sessions() as session:
        candidates = session.scalars(
            select(Job.id).where(Job.kind == kind, runnable).order_by(Job.not_before, Job.id).limit(8)
        ).all()
        for job_id in candidates:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, runnable)
                .values(state="running", lease_owner=owner, lease_expires_at=now + dt.timedelta(seconds=lease_s),
                        attempts=Job.attempts + 1, updated_at=now)
            )
            session.commit()
            if result.rowcount == 1:
                job = session.get(Job, job_id)
                session.execute(update(Series).where(Series.id == job.series_fk).values(classification_state="running"))
                session.commit()
                return job
    return None


def extend_lease(sessions: sessionmaker[Session], job_id: int, owner: str, lease_s: float) -> bool:
    """Push the lease of a job this worker holds; False if the lease was lost to another worker."""
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(lease_expires_at=now + dt.timedelta(seconds=lease_s), updated_at=now)
        )
        session.commit()
        return result.rowcount == 1


def finish(sessions: sessionmaker[Session], job_id: int, owner: str, state: str, reason: str = "") -> bool:
    """Mark a held job done or skipped (``state``); False if this worker no longer held it."""
    if state not in ("done", "skipped"):
        raise ValueError(f"finish() state must be 'done' or 'skipped', got {state!r}")
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(state=state, error=reason, lease_expires_at=None, updated_at=now)
        )
        if result.rowcount == 1:
            job = session.get(Job, job_id)
            session.execute(update(Series).where(Series.id == job.series_fk)
                            .values(classification_state=state, classification_reason=reason))
        session.commit()
        return result.rowcount == 1


def fail(sessions: sessionmaker[Session], job_id: int, owner: str, error: str, max_attempts: int,
         backoff_s: float) -> str:
    """Record an error on a held job: back to the queue after a backoff, or failed after ``max_attempts``.

    Returns the job's new state ("queued" or "failed"); "lost" if this worker no longer held it.
    """
    now = utcnow()
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.lease_owner != owner or job.state != "running":
            return "lost"
        if job.attempts >= max_attempts:
            job.state = "failed"
            session.execute(update(Series).where(Series.id == job.series_fk)
                            .values(classification_state="failed", classification_reason=error))
        else:
            job.state = "queued"
            job.not_before = now + dt.timedelta(seconds=backoff_s * (2 ** (job.attempts - 1)))
            session.execute(update(Series).where(Series.id == job.series_fk).values(classification_state="queued"))
        job.error = error
        job.lease_owner = ""
        job.lease_expires_at = None
        job.updated_at = now
        state = job.state
        session.commit()
    log.warning("job %d (%s): %s", job_id, state, error)
    return state
