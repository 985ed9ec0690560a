"""The durable job queue: rows in ``jobs``, claimed with a lease, retried with backoff, failed after N.

Claiming is a compare-and-set UPDATE, so any number of workers on SQLite or PostgreSQL (one machine
or several) can share the queue: each job runs on one worker at a time, and a worker that dies leaves
its job to be claimed again once the lease has expired. On PostgreSQL the candidates are selected
``FOR UPDATE SKIP LOCKED``, so concurrent workers take different jobs instead of contending for the
same oldest ones. Every time (lease expiry, backoff, ``updated_at``) is the database's clock
(:mod:`dicomnode.db.clock`), so machines with skewed clocks share one queue safely.

``attempts`` counts every claim: a job whose worker was killed (its lease expired) counts as an
attempt, and a job that has used ``max_attempts`` ends ``failed`` instead of being claimed again, so a
series that kills its worker is not retried forever. :func:`fail` with ``permanent=True`` (pixel data
that does not decode, inconsistent geometry) ends the job ``failed`` at once, without retries.
"""

from __future__ import annotations

import logging

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job, Series
from dicomnode.db.clock import db_utcnow

log = logging.getLogger("dicomnode.queue.jobs")


def enqueue_classification(session: Session, series: Series) -> Job:
    """Queue a classification job for ``series`` unless one is already queued; returns the queued job."""
    job = session.scalar(select(Job).where(Job.series_fk == series.id, Job.state == "queued", Job.kind == "classify"))
    if job is None:
        job = Job(kind="classify", series_fk=series.id, state="queued", not_before=db_utcnow(),
                  created_at=db_utcnow(), updated_at=db_utcnow())
        session.add(job)
    series.classification_state = "queued"
    series.classification_reason = ""
    session.flush()
    return job


def _set_series(session: Session, series_fk: int, kind: str, **values) -> None:
    """Mirror a classification job's state on its series; other kinds (dicomnode.results) leave it alone."""
    if kind != "classify":
        return
    session.execute(update(Series).where(Series.id == series_fk).values(**values))


def _fail_exhausted(session: Session, kind: str, max_attempts: int) -> None:
    """Jobs whose worker died holding them (lease expired) after ``max_attempts`` claims end failed."""
    exhausted = session.execute(
        select(Job.id, Job.series_fk, Job.attempts)
        .where(Job.kind == kind, Job.state == "running", Job.lease_expires_at < db_utcnow(),
               Job.attempts >= max_attempts)
    ).all()
    for job_id, series_fk, attempts in exhausted:
        reason = (f"the worker died or lost contact during each of {attempts} attempt(s) (lease expired); "
                  f"worker.max_attempts is {max_attempts}")
        done = session.execute(
            update(Job).where(Job.id == job_id, Job.state == "running", Job.lease_expires_at < db_utcnow())
            .values(state="failed", error=reason, lease_owner="", lease_expires_at=None, updated_at=db_utcnow())
        ).rowcount
        if done == 1:
            _set_series(session, series_fk, kind, classification_state="failed", classification_reason=reason)
            log.warning("job %d failed: %s", job_id, reason)
    session.commit()


def claim_next(sessions: sessionmaker[Session], owner: str, lease_s: float, kind: str = "classify",
               max_attempts: int = 0) -> Job | None:
    """Claim the oldest runnable job (queued and due, or running with an expired lease); None if none.

    ``max_attempts`` > 0: a job with an expired lease that was already claimed that many times ends
    ``failed`` instead (its worker died every time).
    """
    runnable = or_(
        and_(Job.state == "queued", Job.not_before <= db_utcnow()),
        and_(Job.state == "running", Job.lease_expires_at < db_utcnow()),
    )
    with sessions() as session:
        if max_attempts > 0:
            _fail_exhausted(session, kind, max_attempts)
        candidates = session.scalars(
            select(Job.id).where(Job.kind == kind, runnable).order_by(Job.not_before, Job.id).limit(8)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite serialises writers and ignores it
        ).all()
        for job_id in candidates:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, runnable)
                .values(state="running", lease_owner=owner, lease_expires_at=db_utcnow(lease_s),
                        attempts=Job.attempts + 1, updated_at=db_utcnow())
            )
            if result.rowcount == 1:
                job = session.get(Job, job_id)
                _set_series(session, job.series_fk, job.kind, classification_state="running")
                session.commit()
                session.refresh(job)
                session.expunge(job)
                return job
        session.commit()
    return None


def extend_lease(sessions: sessionmaker[Session], job_id: int, owner: str, lease_s: float) -> bool:
    """Push the lease of a job this worker holds; False if the lease was lost to another worker."""
    with sessions() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(lease_expires_at=db_utcnow(lease_s), updated_at=db_utcnow())
        )
        session.commit()
        return result.rowcount == 1


def finish(sessions: sessionmaker[Session], job_id: int, owner: str, state: str, reason: str = "") -> bool:
    """Mark a held job done or skipped (``state``); False if this worker no longer held it."""
    if state not in ("done", "skipped"):
        raise ValueError(f"finish() state must be 'done' or 'skipped', got {state!r}")
    with sessions() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(state=state, error=reason, lease_expires_at=None, updated_at=db_utcnow())
        )
        if result.rowcount == 1:
            series_fk, kind = session.execute(select(Job.series_fk, Job.kind).where(Job.id == job_id)).one()
            _set_series(session, series_fk, kind, classification_state=state, classification_reason=reason)
        session.commit()
        return result.rowcount == 1


def fail(sessions: sessionmaker[Session], job_id: int, owner: str, error: str, max_attempts: int,
         backoff_s: float, permanent: bool = False) -> str:
    """Record an error on a held job: back to the queue after a backoff, or failed after ``max_attempts``
    (at once when ``permanent``: the same input would fail the same way again).

    Returns the job's new state ("queued" or "failed"); "lost" if this worker no longer held it.
    """
    with sessions() as session:
        row = session.execute(
            select(Job.attempts, Job.series_fk, Job.kind)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
        ).first()
        if row is None:
            return "lost"
        attempts, series_fk, kind = row
        held = and_(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
        if permanent or attempts >= max_attempts:
            state = "failed"
            values = {}
            series_values = dict(classification_state="failed", classification_reason=error)
        else:
            state = "queued"
            values = dict(not_before=db_utcnow(backoff_s * (2 ** (attempts - 1))))
            series_values = dict(classification_state="queued")
        done = session.execute(update(Job).where(held).values(
            state=state, error=error, lease_owner="", lease_expires_at=None, updated_at=db_utcnow(), **values)).rowcount
        if done != 1:
            session.rollback()
            return "lost"
        _set_series(session, series_fk, kind, **series_values)
        session.commit()
    log.warning("job %d (%s%s): %s", job_id, state, ", permanent error" if permanent else "", error)
    return state
