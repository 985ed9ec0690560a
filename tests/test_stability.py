"""Series completeness (dicomnode.queue.stability): association release + grace, StableAge as fallback."""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from sqlalchemy import select, update

from conftest import CT_FIXTURES, dcmtk
from dicomnode.db.index import StoredFile, index_instance
from dicomnode.db.models import Job, Series, utcnow
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.queue.stability import mark_stable_series, record_release, release_handlers
from test_jobs import header

SERIES_3 = CT_FIXTURES / "series" / "dcmqi_ge_3slice"


@pytest.fixture
def sessions(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def add(sessions, n: int, series: str = "1.2.3.4", at: dt.datetime | None = None) -> None:
    index_instance(sessions, header(n, series=series), StoredFile(f"x/{n}.dcm", 10))
    if at is not None:
        with sessions.begin() as s:
            s.execute(update(Series).where(Series.series_instance_uid == series).values(last_received_at=at))


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_a_released_series_is_complete_after_the_grace_not_before(sessions):
    start = utcnow() - dt.timedelta(seconds=1)
    for n in range(3):
        add(sessions, n)
    assert record_release(sessions, start) == 1
    # StableAge is an hour: only the release can complete it, and only once the grace has passed.
    assert mark_stable_series(sessions, 3600, now=utcnow(), grace_s=2) == []
    assert mark_stable_series(sessions, 3600, now=later(3), grace_s=2) == ["1.2.3.4"]
    with sessions() as s:
        assert s.scalars(select(Job.state)).all() == ["queued"]


def test_without_a_release_stable_age_is_the_fallback(sessions):
    add(sessions, 1)
    assert mark_stable_series(sessions, 60, now=later(30), grace_s=1) == []  # no release: the grace does not apply
    assert mark_stable_series(sessions, 60, now=later(61), grace_s=1) == ["1.2.3.4"]


def test_an_instance_after_the_release_needs_a_new_release(sessions):
    add(sessions, 1)
    record_release(sessions, utcnow() - dt.timedelta(seconds=1))
    add(sessions, 2, at=later(0.001))  # another association goes on sending this series
    assert mark_stable_series(sessions, 3600, now=later(10), grace_s=1) == []


def test_a_release_stamps_only_series_that_received_during_the_association(sessions):
    add(sessions, 1, series="1.2.3.7", at=utcnow() - dt.timedelta(hours=1))  # before the association
    start = utcnow() - dt.timedelta(seconds=1)
    add(sessions, 2, series="1.2.3.8")
    assert record_release(sessions, start) == 1
    assert mark_stable_series(sessions, 7200, now=later(5), grace_s=1) == ["1.2.3.8"]


def test_a_late_instance_reopens_a_complete_series_for_the_next_mark(sessions):
    add(sessions, 1)
    record_release(sessions, utcnow() - dt.timedelta(seconds=1))
    assert mark_stable_series(sessions, 3600, now=later(5), grace_s=1) == ["1.2.3.4"]
    start = utcnow()
    add(sessions, 2)  # late: re-opened, its queued job cancelled
    with sessions() as s:
        assert s.scalars(select(Series.state)).one() == "receiving"
    assert mark_stable_series(sessions, 3600, now=later(5), grace_s=1) == []  # the old release does not count
    record_release(sessions, start)
    assert mark_stable_series(sessions, 3600, now=later(5), grace_s=1) == ["1.2.3.4"]
    with sessions() as s:
        assert s.scalars(select(Job.state).order_by(Job.id)).all() == ["cancelled", "queued"]


def test_release_handlers_stamp_a_series_sent_by_storescu(node_ctx):
    """A real DCMTK association against the listener, with the node's release handlers bound."""
    from dicomnode.receive.listener import start_listener

    server = start_listener(node_ctx)
    try:
        for event, handler in release_handlers(node_ctx.sessions):
            server.bind(event, handler)
        sent = subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(node_ctx.config.port), "+sd",
                               str(SERIES_3)], capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
    finally:
        server.shutdown()
        server.server_close()
    with node_ctx.sessions() as s:
        series = s.scalars(select(Series)).one()
    # storescu released the association after its last C-STORE response: stamped, not complete before the grace.
    assert series.released_at is not None and series.released_at >= series.last_received_at
    assert series.state == "receiving"
    assert mark_stable_series(node_ctx.sessions, 3600, now=series.last_received_at + dt.timedelta(seconds=0.5),
                              grace_s=1) == []
    assert mark_stable_series(node_ctx.sessions, 3600, now=series.last_received_at + dt.timedelta(seconds=2),
                              grace_s=1) == [series.series_instance_uid]
