"""The durable queue on SQLite and PostgreSQL: claims, leases, retries with backoff, failure after N."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp

import pytest
from sqlalchemy import select, update

from dicomnode.queue import jobs
from dicomnode.db.index import StoredFile, index_instance
from dicomnode.db.models import Job, Series, utcnow
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.db.clock import db_utcnow
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


def _claim_all(url: str, name: str, barrier, results) -> None:
    """Body of one claiming process: its own engine and connections, claims until the queue is empty."""
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    claimed = []
    barrier.wait(120)  # every process starts claiming at the same moment
    while (job := jobs.claim_next(sessions, name, lease_s=600, max_attempts=3)) is not None:
        claimed.append(job.id)
    engine.dispose()
    results.put((name, claimed))


def expire_leases(sessions) -> None:
    """Every running job's lease runs out now, by the database's clock."""
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.state == "running").values(lease_expires_at=db_utcnow(-1)))


def test_concurrent_claims_from_several_processes_take_each_job_exactly_once(db_url, sessions):
    """Real concurrency: processes with their own connections claim from PostgreSQL at once."""
    if not db_url.startswith("postgresql"):
        pytest.skip("real concurrent claims need PostgreSQL (SQLite serialises its writers)")
    n_jobs, n_procs = 60, 4
    for n in range(n_jobs):
        add(sessions, n, series=f"1.2.3.{100 + n}")
    mark_stable_series(sessions, 1, now=later(2))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n_procs), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db_url, f"p{i}", barrier, results)) for i in range(n_procs)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    claimed = [job_id for ids in got.values() for job_id in ids]
    assert sorted(claimed) == sorted(set(claimed)), "a job was claimed twice"
    assert len(claimed) == n_jobs
    with sessions() as s:
        rows = s.scalars(select(Job)).all()
    assert all(j.state == "running" and j.attempts == 1 for j in rows)
    assert {j.id: j.lease_owner for j in rows} == {job_id: name for name, ids in got.items() for job_id in ids}


def test_an_expired_lease_is_claimed_again_and_the_old_holder_loses(sessions):
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    job = jobs.claim_next(sessions, "w0", lease_s=3600)
    assert jobs.claim_next(sessions, "rescuer", lease_s=60) is None  # within the lease nobody else may
    expire_leases(sessions)  # the worker died; its lease runs out
    again = jobs.claim_next(sessions, "rescuer", lease_s=60)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert jobs.finish(sessions, job.id, "rescuer", "done")
    assert not jobs.finish(sessions, job.id, "w0", "done")  # the old holder lost its lease


def test_max_attempts_counts_the_claims_of_killed_workers(sessions):
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    for attempt in (1, 2):  # each claimant dies holding the job
        job = jobs.claim_next(sessions, f"doomed-{attempt}", lease_s=3600, max_attempts=2)
        assert job is not None and job.attempts == attempt
        expire_leases(sessions)
    assert jobs.claim_next(sessions, "third", lease_s=60, max_attempts=2) is None  # not a third time
    with sessions() as s:
        row = s.scalars(select(Job)).one()
        assert row.state == "failed" and row.attempts == 2 and "lease expired" in row.error
        series = s.scalars(select(Series)).one()
        assert series.classification_state == "failed" and series.classification_reason == row.error


def test_a_worker_with_a_fast_clock_does_not_steal_a_live_lease(sessions, monkeypatch):
    """Leases are the database's clock: this process's clock an hour ahead changes nothing."""
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    assert jobs.claim_next(sessions, "w0", lease_s=600) is not None
    ahead = utcnow() + dt.timedelta(hours=1)
    monkeypatch.setattr("dicomnode.db.models.utcnow", lambda: ahead)
    monkeypatch.setattr(jobs, "utcnow", lambda: ahead, raising=False)
    assert jobs.claim_next(sessions, "skewed", lease_s=600) is None
    assert jobs.extend_lease(sessions, 1, "w0", 600)


def test_a_permanent_error_fails_at_once(sessions):
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    job = jobs.claim_next(sessions, "w", lease_s=60)
    assert jobs.fail(sessions, job.id, "w", "mixed image sizes", max_attempts=3, backoff_s=30,
                     permanent=True) == "failed"
    with sessions() as s:
        assert s.scalars(select(Job.state)).one() == "failed"
        assert s.scalars(select(Series.classification_reason)).one() == "mixed image sizes"


def test_retry_with_backoff_then_failed_with_error_kept(sessions):
    add(sessions, 1)
    mark_stable_series(sessions, 1, now=later(2))
    job = jobs.claim_next(sessions, "w", lease_s=60)
    assert jobs.fail(sessions, job.id, "w", "boom 1", max_attempts=2, backoff_s=30) == "queued"
    assert jobs.claim_next(sessions, "w", lease_s=60) is None  # backing off
    with sessions.begin() as s:  # the backoff runs out, by the database's clock
        s.execute(update(Job).values(not_before=db_utcnow(-1)))
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
