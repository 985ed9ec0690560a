"""The durable queue on SQLite and PostgreSQL: claims, leases, retries with backoff, failure after N."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from dicomnode.queue import jobs
from dicomnode.db.index import StoredFile, index_instance
from dicomnode.db.models import Job, Series, utcnow
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.receive.headers import InstanceHeader
from dicomnode.queue.stability import mark_stable_series


@pytest.fixture
def sessions(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def header(n: int, series: str = "1.2.3.4", modality: str = "CT") -> InstanceHeader:
    return InstanceHeader(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"1.2.3.4.{n}",
                          study_instance_uid="1.2.3", series_instance_uid=series,
                          transfer_syntax_uid="1.2.840.10008.1.2.1", modality=modality, instance_number=n)


def add(sessions, n: int, **kw) -> None:
    index_instance(sessions, header(n, **kw), StoredFile(f"x/{n}.dcm", 10))


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_stable_series_is_enqueued_once(sessions):
    for n in range(3):
        add(sessions, n)
    assert mark_stable_series(sessions, 60) == []  # not quiet long enough yet
    assert mark_stable_series(sessions, 60, now=later(61)) == ["1.2.3.4"]
    assert mark_stable_series(sessions, 60, now=later(120)) == []
    with sessions() as s:
        queued = s.query(Job).filter_by(state="queued").all()
        assert len(queued) == 1
        assert s.query(Series).one().classification_state == "queued"


def test_late_instance_reopens_and_requeues(sessions):
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    add(sessions, 2)  # late instance: the queued job is cancelled, the series receives again
    with sessions() as s:
        assert s.query(Series).one().state == "receiving"
        assert [j.state for j in s.query(Job).order_by(Job.id)] == ["cancelled"]
    mark_stable_series(sessions, 1, now=later(2))
    with sessions() as s:
        assert [j.state for j in s.query(Job).order_by(Job.id)] == ["cancelled", "queued"]


def test_non_ct_series_is_skipped_with_a_reason(sessions):
    add(sessions, 1, series="1.2.3.9", modality="MR")
    mark_stable_series(sessions, 1, now=later(2))
    with sessions() as s:
        series = s.query(Series).one()
        assert series.classification_state == "skipped"
        assert "MR" in series.classification_reason
        assert s.query(Job).count() == 0


def test_claim_lease_expiry_and_concurrent_claims(sessions):
    for n in range(4):
        add(sessions, n, series=f"1.2.3.{10 + n}")
    mark_stable_series(sessions, 1, now=later(2))
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := jobs.claim_next(sessions, name, lease_s=60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 4  # each job claimed exactly once

    # A worker that dies keeps nothing: once its lease expires, another claims the job.
    with sessions() as s:
        job = s.query(Job).first()
        job.lease_expires_at = utcnow() - dt.timedelta(seconds=1)
        s.commit()
        job_id = job.id
    again = jobs.claim_next(sessions, "rescuer", lease_s=60)
    assert again is not None and again.id == job_id and again.attempts == 2
    assert jobs.finish(sessions, job_id, "rescuer", "done")
    assert not jobs.finish(sessions, job_id, "w0", "done")  # the old holder lost its lease


def test_retry_with_backoff_then_failed_with_error_kept(sessions):
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    job = jobs.claim_next(sessions, "w", lease_s=60)
    assert jobs.fail(sessions, job.id, "w", "boom 1", max_attempts=2, backoff_s=30) == "queued"
    assert jobs.claim_next(sessions, "w", lease_s=60) is None  # backing off
    with sessions() as s:
        s.get(Job, job.id).not_before = utcnow() - dt.timedelta(seconds=1)
        s.commit()
    job = jobs.claim_next(sessions, "w", lease_s=60)
    assert job.attempts == 2
    assert jobs.fail(sessions, job.id, "w", "boom 2", max_attempts=2, backoff_s=30) == "failed"
    with sessions() as s:
        row = s.get(Job, job.id)
        assert row.state == "failed" and row.error == "boom 2"
        series = s.query(Series).one()
        assert series.classification_state == "failed" and series.classification_reason == "boom 2"


def test_skip_keeps_reason(sessions):
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    job = jobs.claim_next(sessions, "w", lease_s=60)
    assert jobs.finish(sessions, job.id, "w", "skipped", "localizer")
    with sessions() as s:
        assert s.query(Series).one().classification_reason == "localizer"
    with pytest.raises(ValueError, match="state"):
        jobs.finish(sessions, job.id, "w", "exploded")
