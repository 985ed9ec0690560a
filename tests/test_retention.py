"""Retention: the oldest finished, unprotected studies go first, files and rows together; delete/protect."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from io import BytesIO

import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from sqlalchemy import func, select

from conftest import CT_FIXTURES
from dicomnode.config import RetentionConfig
from dicomnode.db.models import Instance, Job, Patient, Series, Study, utcnow
from dicomnode.receive.ingest import SUCCESS, store_instance
from dicomnode.receive.recovery import DELETING_PREFIX, check_storage, finish_deletions
from dicomnode.receive.retention import StudyNotDeletable, delete_study, recycle, set_protected

SLICE = CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm"
PREFIX = "1.2.826.0.1.3680043.8.498.5150."


def add_study(ctx, n: int, days_ago: float, classification: str = "done", job: str | None = None,
              protected: bool = False) -> str:
    """One study of one single-instance series (about 0.5 MiB), last received ``days_ago``."""
    ds = pydicom.dcmread(SLICE)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (f"{PREFIX}{n}.1", f"{PREFIX}{n}.2",
                                                                     f"{PREFIX}{n}.3")
    ds.PatientName, ds.PatientID = f"Doe^Patient{n}", f"SECRET-PID-{n}"
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    assert store_instance(ctx, buf.getvalue()) == SUCCESS
    with ctx.sessions.begin() as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == ds.SeriesInstanceUID))
        series.last_received_at = utcnow() - dt.timedelta(days=days_ago)
        series.state = "stable" if classification != "none" else "receiving"
        series.classification_state = classification
        if job:
            s.add(Job(series_fk=series.id, state=job))
        if protected:
            series.study.protected = True
    return ds.StudyInstanceUID


def studies(ctx) -> set[str]:
    with ctx.sessions() as s:
        return set(s.scalars(select(Study.study_instance_uid)))


def test_recycling_by_size_takes_the_oldest_finished_unprotected_studies(node_ctx, caplog):
    oldest = add_study(node_ctx, 1, 10)
    protected = add_study(node_ctx, 2, 9, protected=True)
    receiving = add_study(node_ctx, 4, 7, classification="none")  # (queued and running: the age test)
    older = add_study(node_ctx, 5, 6, classification="skipped")
    newest = add_study(node_ctx, 6, 5, classification="failed")
    caplog.set_level("INFO", logger="dicomnode.receive.retention")
    # Five studies of 0.5 MiB + a header each: above 2 MiB until the two oldest recyclable ones are gone.
    deleted = recycle(node_ctx.sessions, node_ctx.storage_dir, RetentionConfig(enabled=True, max_storage_mb=2))
    assert deleted == [oldest, older]
    assert studies(node_ctx) == {protected, receiving, newest}
    assert check_storage(node_ctx.storage_dir, node_ctx.sessions).consistent  # files and rows together
    assert not (node_ctx.storage_dir / oldest).exists()
    lines = [r.getMessage() for r in caplog.records if "deleted study" in r.getMessage()]
    assert len(lines) == 2 and oldest in lines[0] and "max_storage_mb" in lines[0]
    assert "Doe" not in caplog.text and "SECRET-PID" not in caplog.text
    with node_ctx.sessions() as s:  # the patients of the deleted studies went with them
        assert s.scalar(select(func.count()).select_from(Patient)) == 3
    # Within the limit now: nothing more goes.
    assert recycle(node_ctx.sessions, node_ctx.storage_dir, RetentionConfig(enabled=True, max_storage_mb=2)) == []


def test_recycling_by_age(node_ctx):
    old = add_study(node_ctx, 1, 3)
    old_protected = add_study(node_ctx, 2, 3, protected=True)
    old_running = add_study(node_ctx, 3, 3, classification="running", job="running")
    old_queued = add_study(node_ctx, 5, 3, classification="queued", job="queued")
    recent = add_study(node_ctx, 4, 0.1)
    cfg = RetentionConfig(enabled=True, max_age_days=1)
    assert recycle(node_ctx.sessions, node_ctx.storage_dir, cfg) == [old]
    assert studies(node_ctx) == {old_protected, old_running, old_queued, recent}
    # Unprotected, it goes too.
    set_protected(node_ctx.sessions, old_protected, False)
    assert recycle(node_ctx.sessions, node_ctx.storage_dir, cfg) == [old_protected]


def test_no_limit_deletes_nothing(node_ctx):
    add_study(node_ctx, 1, 1000)
    assert recycle(node_ctx.sessions, node_ctx.storage_dir, RetentionConfig(enabled=True)) == []
    assert len(studies(node_ctx)) == 1


def test_delete_study_refuses_protected_and_unfinished_unless_forced(node_ctx):
    protected = add_study(node_ctx, 1, 1, protected=True)
    queued = add_study(node_ctx, 2, 1, classification="queued", job="queued")
    for uid in (protected, queued):
        with pytest.raises(StudyNotDeletable, match="--force"):
            delete_study(node_ctx.sessions, node_ctx.storage_dir, uid, "test")
    with pytest.raises(StudyNotDeletable, match="not in the index"):
        delete_study(node_ctx.sessions, node_ctx.storage_dir, "1.2.3.4", "test")
    usage = delete_study(node_ctx.sessions, node_ctx.storage_dir, queued, "test", force=True)
    assert usage.instances == 1 and usage.size_bytes > 0
    with node_ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
    assert studies(node_ctx) == {protected}


def test_an_interrupted_deletion_is_finished_or_undone_at_start(node_ctx):
    kept = add_study(node_ctx, 1, 1)
    gone = add_study(node_ctx, 2, 1)
    storage = node_ctx.storage_dir
    # Crash after the rename, before the commit: the rows are there, the folder comes back.
    os.replace(storage / kept, storage / f"{DELETING_PREFIX}{kept}")
    # Crash after the commit, before the folder was removed: it is removed.
    delete_study(node_ctx.sessions, storage, gone, "test")
    (storage / f"{DELETING_PREFIX}{gone}" / "x").mkdir(parents=True)
    finish_deletions(storage, node_ctx.sessions)
    assert sorted(os.listdir(storage)) == [kept]
    assert check_storage(storage, node_ctx.sessions).consistent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_protect_and_delete(node_ctx):
    uid = add_study(node_ctx, 1, 1)
    data = str(node_ctx.config.resolved_data_dir)
    assert run_cli("protect", "--study", uid, "--data-dir", data).returncode == 0
    refused = run_cli("delete", "--study", uid, "--data-dir", data)
    assert refused.returncode == 1 and "protected" in refused.stderr
    assert run_cli("protect", "--study", uid, "--off", "--data-dir", data).returncode == 0
    done = run_cli("delete", "--study", uid, "--data-dir", data)
    assert done.returncode == 0, done.stderr
    assert uid in done.stdout and studies(node_ctx) == set()
    assert not list(node_ctx.storage_dir.rglob("*.dcm"))
    bad = run_cli("delete", "--study", "../etc", "--data-dir", data)
    assert bad.returncode == 1 and "StudyInstanceUID" in bad.stderr


def test_the_scheduled_job_recycles(node_ctx):
    """What ``serve`` starts (dicomnode.node): the APScheduler job, every retention.check_interval_s."""
    import time

    from dicomnode.receive.retention import start_retention

    old = add_study(node_ctx, 1, 30)
    assert start_retention(node_ctx.sessions, node_ctx.storage_dir, RetentionConfig(enabled=False, max_age_days=1)) \
        is None
    scheduler = start_retention(node_ctx.sessions, node_ctx.storage_dir,
                                RetentionConfig(enabled=True, max_age_days=7, check_interval_s=0.2))
    try:
        deadline = time.monotonic() + 60  # bounds a hang only
        while old in studies(node_ctx) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        scheduler.shutdown(wait=True)
    assert studies(node_ctx) == set()
