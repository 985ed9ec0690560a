"""Series completeness: a series quiet for ``stable_age_s`` is stable and gets a classification job.

Like Orthanc's StableAge. A late instance re-opens the series (see ``db.index``) and the next
stable mark enqueues it again. Run periodically by APScheduler in the node's main process.
"""

from __future__ import annotations

import datetime as dt
import logging

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Series, utcnow
from dicomnode.queue.jobs import enqueue_classification

log = logging.getLogger("dicomnode.queue.stability")

CLASSIFIED_MODALITIES = {"CT"}


def mark_stable_series(sessions: sessionmaker[Session], stable_age_s: float, now: dt.datetime | None = None) -> list[str]:
    """Mark every series quiet for ``stable_age_s`` as stable and enqueue it; return their UIDs.

    Each series is claimed with a conditional UPDATE, so several nodes sharing one database never
    enqueue the same series twice.
    """
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=stable_age_s)
    marked: list[str] = []
    with sessions() as session:
        due = session.execute(
            select(Series.id, Series.last_received_at)
            .where(Series.state == "receiving", Series.last_received_at <= cutoff)
        ).all()
        for series_id, last_received in due:
            claimed = session.execute(
                update(Series)
                .where(Series.id == series_id, Series.state == "receiving", Series.last_received_at == last_received)
                .values(state="stable", stable_at=now)
            )
            if claimed.rowcount != 1:
                session.rollback()
                continue
            series = session.get(Series, series_id)
            if series.modality.upper() in CLASSIFIED_MODALITIES:
                enqueue_classification(session, series)
                log.info("series %s stable: classification queued", series.series_instance_uid)
            else:
                series.classification_state = "skipped"
                series.classification_reason = f"modality {series.modality or '(none)'} is not classified (CT only)"
                log.info("series %s stable: %s", series.series_instance_uid, series.classification_reason)
            session.commit()
            marked.append(series.series_instance_uid)
    return marked


def start_scheduler(sessions: sessionmaker[Session], stable_age_s: float, interval_s: float) -> BackgroundScheduler:
    """Start the APScheduler job that runs :func:`mark_stable_series` every ``interval_s`` seconds."""
    scheduler = BackgroundScheduler(daemon=True)

    def tick() -> None:
        try:
            mark_stable_series(sessions, stable_age_s)
        except Exception:  # keep the scheduler alive; the next tick retries
            log.exception("stability check failed")

    scheduler.add_job(tick, "interval", seconds=interval_s, id="stability", max_instances=1, coalesce=True,
                      next_run_time=dt.datetime.now())
    scheduler.start()
    return scheduler
