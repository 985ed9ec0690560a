"""dicomnode.http.metrics, events and collectors: counts of several real processes add up, stale files of an
earlier run go, a hook never raises, and the index gauges are read from SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from dicomnode.http import collectors, events, metrics


@pytest.fixture
def metrics_setup(tmp_path):
    folder = metrics.setup(tmp_path, fresh=True)
    yield folder
    metrics.reset()


def _samples(folder, sessions) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body, content_type = collectors.exposition(folder, sessions)
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _record_in_child(n: int) -> None:
    """Body of a spawned process: it finds the folder in the environment, as a listener process does."""
    for _ in range(n):
        metrics.cstore(0x0000)
    metrics.cstore(0xC210)
    metrics.association_accepted()


def test_counts_of_several_processes_add_up(metrics_setup, index):
    spawn = mp.get_context("spawn")
    children = [spawn.Process(target=_record_in_child, args=(n,)) for n in (3, 5)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    metrics.cstore(0x0000)  # and this process
    metrics.job_finished("classify", "done", 0.0)
    metrics.classified(2.5, None)
    got = _samples(metrics_setup, index[1])
    assert got["dicomnode_instances_received_total{}"] == 9
    assert got['dicomnode_cstore_responses_total{status="0x0000"}'] == 9
    assert got['dicomnode_cstore_responses_total{status="0xC210"}'] == 2
    assert got['dicomnode_associations_total{outcome="accepted",reason=""}'] == 2
    assert got['dicomnode_jobs_finished_total{kind="classify",outcome="done"}'] == 1
    assert got["dicomnode_classification_duration_seconds_count{}"] == 1
    assert got["dicomnode_classification_duration_seconds_sum{}"] == 2.5
    # The children are gone: a fresh start removes their files (an earlier run), keeps this process's.
    assert metrics.remove_stale_files(metrics_setup) == 4  # a counter and a histogram file per child
    assert sorted(p.name for p in metrics_setup.glob("*.db")) == [f"counter_{os.getpid()}.db",
                                                                  f"histogram_{os.getpid()}.db"]


def test_hooks_are_no_ops_before_setup_and_never_raise(tmp_path):
    metrics.reset()
    assert metrics.cstore(0xA700) == 0xA700  # not set up: nothing recorded, status passed through
    assert metrics.job_finished("classify", "done", 0.0) == "done"
    metrics.setup(tmp_path)
    try:
        # Whatever is wrong with what a hook is handed, the C-STORE's status comes back.
        assert metrics.cstore(0xC220, event=object()) == 0xC220
        metrics.association_rejected(object(), "calling_ae_title_not_allowed")
        metrics.classified(float("nan"), "not a datetime")
    finally:
        metrics.reset()


def test_events_are_merged_newest_first(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "events-1.json").write_text('[{"time": "2026-12-01T10:00:00Z", "kind": "association_rejected", '
                                          '"calling_ae_title": "OLD"}]')
    (folder / "events-2.json").write_text("{ torn")  # a file being replaced: skipped, not an error
    events.record(folder, "cstore_refused", status="0xC210", sop_instance_uid="1.2.3")
    events.record(folder, "association_rejected", calling_ae_title="NEW", reason="local_limit_exceeded")
    got = events.recent(folder, "association_rejected")
    assert [e["calling_ae_title"] for e in got] == ["NEW", "OLD"]
    assert [e["status"] for e in events.recent(folder, "cstore_refused")] == ["0xC210"]


def test_index_gauges(db_url, tmp_path):
    from dicomnode.config import load_config
    from dicomnode.db.models import Job, Patient, Series, Study
    from dicomnode.db.session import open_index, upgrade

    if not db_url.startswith("sqlite"):
        upgrade(db_url, backup=False)
    engine, sessions = open_index(load_config(None, {"data_dir": str(tmp_path), "database_url": db_url}))
    try:
        with sessions.begin() as s:
            patient = Patient(patient_id="P1", patient_name="DOE^JANE")
            study = Study(patient=patient, study_instance_uid="1.2.826.0.1.1")
            s.add_all([patient, study])
            for i, state in enumerate(["queued", "queued", "running", "failed"]):
                series = Series(study=study, series_instance_uid=f"1.2.826.0.1.1.{i}", classification_state=state)
                s.add(series)
                s.flush()
                s.add(Job(kind="classify", series_fk=series.id, state=state))
            s.add(Job(kind="results", series_fk=series.id, state="done"))
        folder = metrics.metrics_dir(tmp_path)
        folder.mkdir()
        got = _samples(folder, sessions)
    finally:
        engine.dispose()
    assert got['dicomnode_queue_jobs{kind="classify",state="queued"}'] == 2
    assert got['dicomnode_queue_jobs{kind="classify",state="running"}'] == 1
    assert got['dicomnode_queue_jobs{kind="classify",state="failed"}'] == 1
    assert got['dicomnode_queue_jobs{kind="classify",state="done"}'] == 0
    assert got['dicomnode_queue_jobs{kind="results",state="done"}'] == 1
    assert got['dicomnode_index_series{classification_state="queued"}'] == 2
    assert got["dicomnode_index_studies{}"] == 1
    assert got["dicomnode_index_instances{}"] == 0
