"""Series completeness: when a series is complete enough to classify, it gets a classification job.

Two signals, whichever comes first (a late instance re-opens the series, see ``db.index``, and the
next mark enqueues it again, so its results are recomputed):

- **release + grace** (``worker.release_grace_s``, default 1 s): an association that carried instances
  of the series was released (:func:`record_release`, bound to the listener's EVT_RELEASED by the
  node) after the series' last instance, and no instance came for the grace since. Most senders send
  a series in one association, so this is seconds after the last C-STORE instead of a minute.
- **StableAge** (``stable_age_s``, Orthanc's StableAge): quiet that long without any release (a sender
  that keeps its association open, an aborted association). The fallback.

Comparisons and ``stable_at`` use the database's clock (:mod:`dicomnode.db.clock`). Run
periodically by APScheduler in the node's main process; each series is claimed with a conditional
UPDATE, so several nodes sharing one database never enqueue the same series twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any, Callable

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Series, utcnow
from dicomnode.db.clock import db_utcnow
from dicomnode.queue.jobs import enqueue_classification

log = logging.getLogger("dicomnode.queue.stability")

CLASSIFIED_MODALITIES = {"CT"}


def _before(now: dt.datetime | None, seconds: float):
    """``now - seconds``: the database's clock, or an explicit ``now`` (tests, replays)."""
    return db_utcnow(-seconds) if now is None else now - dt.timedelta(seconds=seconds)


def mark_stable_series(sessions: sessionmaker[Session], stable_age_s: float, now: dt.datetime | None = None,
                       grace_s: float = 0.0) -> list[str]:
    """Mark every complete series stable and enqueue it; return their UIDs.

    Complete: quiet for ``stable_age_s``, or (``grace_s`` > 0) released after its last instance and
    quiet for ``grace_s``. ``now``: None = the database's clock.
    """
    complete = Series.last_received_at <= _before(now, stable_age_s)
    if grace_s > 0:
        complete = or_(complete, and_(Series.released_at.is_not(None), Series.released_at >= Series.last_received_at,
                                      Series.last_received_at <= _before(now, grace_s)))
    marked: list[str] = []
    with sessions() as session:
        due = session.execute(
            select(Series.id, Series.last_received_at).where(Series.state == "receiving", complete)
        ).all()
        for series_id, last_received in due:
            claimed = session.execute(
                update(Series)
                .where(Series.id == series_id, Series.state == "receiving", Series.last_received_at == last_received)
                .values(state="stable", stable_at=db_utcnow() if now is None else now)
            )
            if claimed.rowcount != 1:
                session.rollback()
                continue
            series = session.get(Series, series_id)
            if series.modality.upper() in CLASSIFIED_MODALITIES:
                enqueue_classification(session, series)
                log.info("series %s complete: classification queued", series.series_instance_uid)
            else:
                series.classification_state = "skipped"
                series.classification_reason = f"modality {series.modality or '(none)'} is not classified (CT only)"
                log.info("series %s complete: %s", series.series_instance_uid, series.classification_reason)
            session.commit()
            marked.append(series.series_instance_uid)
    return marked


def record_release(sessions: sessionmaker[Session], since: dt.datetime) -> int:
    """An association established at ``since`` was released: stamp ``released_at`` on the series still
    receiving that got an instance since then. Returns the number of series stamped.

    ``since`` and ``released_at`` are this listener's clock, the clock that wrote ``last_received_at``
    (``db.index``), since the completeness rule compares them with each other.
    """
    with sessions.begin() as session:
        return session.execute(
            update(Series).where(Series.state == "receiving", Series.last_received_at >= since)
            .values(released_at=utcnow())
        ).rowcount


def release_handlers(sessions: sessionmaker[Session]) -> list[tuple[Any, Callable]]:
    """pynetdicom (event, handler) pairs that record association releases for :func:`mark_stable_series`.

    A database error is logged and ignored: the series then completes by StableAge.
    """
    from pynetdicom import evt

    def established(event) -> None:
        event.assoc.dicomnode_established_at = utcnow()

    def released(event) -> None:
        since = getattr(event.assoc, "dicomnode_established_at", None)
        if since is None:
            return
        try:
            record_release(sessions, since)
        except Exception as exc:
            log.warning("could not record an association release (StableAge applies): %s", exc)

    return [(evt.EVT_ESTABLISHED, established), (evt.EVT_RELEASED, released)]


def scheduler_interval(check_interval_s: float, grace_s: float) -> float:
    """Seconds between two completeness checks: a quarter of the grace where that is shorter."""
    return min(check_interval_s, max(0.1, grace_s / 4.0)) if grace_s > 0 else check_interval_s


class _Ticker:
    """A daemon thread that runs ``tick`` every ``interval_s`` seconds, never two at once; ``shutdown`` stops it.

    Used for intervals below a second, where APScheduler would log every tick that overlaps a slow one.
    """

    def __init__(self, tick: Callable[[], None], interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(tick, interval_s), name="dicomnode-stability",
                                        daemon=True)
        self._thread.start()

    def _run(self, tick: Callable[[], None], interval_s: float) -> None:
        while True:
            tick()
            if self._stop.wait(interval_s):
                return

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            self._thread.join(30)


def start_scheduler(sessions: sessionmaker[Session], stable_age_s: float, interval_s: float,
                    grace_s: float = 0.0):
    """Run :func:`mark_stable_series` every ``interval_s`` seconds (APScheduler; a plain thread below 1 s).

    Returns an object with ``shutdown(wait=...)``.
    """

    def tick() -> None:
        try:
            mark_stable_series(sessions, stable_age_s, grace_s=grace_s)
        except Exception:  # keep the scheduler alive; the next tick retries
            log.exception("stability check failed")

    if interval_s < 1.0:
        return _Ticker(tick, interval_s)
    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(tick, "interval", seconds=interval_s, id="stability", max_instances=1, coalesce=True,
                      next_run_time=dt.datetime.now())
    scheduler.start()
    return scheduler
