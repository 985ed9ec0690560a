"""The classification worker on a real SQLite index with real stored CT (dicomnode.queue.worker)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import numpy as np
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from conftest import (CT_FIXTURES, SHARED_DATA, dcmtk, free_port, parent_pid, process_ended, stop_node, wait_for,
                      wait_for_echo)
from dicomnode.queue import jobs, worker
from dicomnode.config import load_config
from dicomnode.db.models import Instance, Job, RegionRange, Series, SliceResult, utcnow
from dicomnode.db.session import upgrade
from dicomnode.receive.ingest import SUCCESS, NodeContext, store_instance
from dicomnode.classification.model import LoadedModel, OnnxModel, make_untrained_checkpoint, onnx_twin_path
from dicomnode.db.session import open_index
from dicomnode.db.clock import db_utcnow
from dicomnode.queue.stability import mark_stable_series
from dicomnode.lifetime import descendants

J2K_SERIES = CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k"
CHEST = SHARED_DATA / "ct" / "series" / "lungpetctdx_a0002_siemens_chest"  # 30 real slices


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_untrained_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture
def setup(tmp_path, checkpoint, db_url):
    """(config file, config, session factory, node context): a fresh index (SQLite file, or PostgreSQL when
    the CI provides one) and the tiny model."""
    data = {
        "data_dir": str(tmp_path / "node"),
        "database_url": db_url,
        "model": {"path": str(checkpoint)},
        "listener": {"fsync": False, "min_free_space_mb": 1},
        "worker": {"lease_s": 4.0, "poll_interval_s": 0.1, "max_attempts": 2, "retry_backoff_s": 0.0,
                   "min_slices": 5, "batch_size": 16, "threads": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    upgrade(db_url, backup=False)
    cfg = load_config(path)
    engine, sessions = open_index(cfg)
    yield path, cfg, sessions, NodeContext(cfg, sessions)
    engine.dispose()


def store_files(ctx, files) -> None:
    for f in files:
        data = f if isinstance(f, bytes) else f.read_bytes()
        assert store_instance(ctx, data, "TESTSCU") == SUCCESS


def enqueue_all(sessions) -> list[str]:
    return mark_stable_series(sessions, 1.0, now=utcnow() + dt.timedelta(hours=1))


def job_rows(sessions) -> list[Job]:
    with sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def count(sessions, model) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def start_worker_process(config_path, log_path) -> subprocess.Popen:
    """`dicomnode worker` as a real process, its output in ``log_path``."""
    return subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(config_path)],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


def state_for(cfg, sessions, owner="test-worker") -> worker.WorkerState:
    return worker.WorkerState(cfg, sessions, owner, threading.Event())


#: worker.batch_size of the two ways a series job reads its files: one batch, read in threads (16 > the
#: 10 files of the J2K series), or several, read in the worker's reader processes.
READ_PATHS = {"threads": 16, "reader-processes": 3}


def with_batch(cfg, batch_size: int):
    return dataclasses.replace(cfg, worker=dataclasses.replace(cfg.worker, batch_size=batch_size))


def stored_probabilities(sessions) -> np.ndarray:
    with sessions() as s:
        return np.array([(r.position, r.p_head or 0.0, r.p_neck, r.p_lungs, r.p_liver, r.p_pelvis, r.p_legs)
                         for r in s.scalars(select(SliceResult).order_by(SliceResult.position))])


def expire_leases(sessions) -> None:
    """Let every running job's lease run out now, by the database's clock (no sleeping on it)."""
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.state == "running").values(lease_expires_at=db_utcnow(-1)))


def block_one_file(sessions, storage_dir):
    """Replace one stored file of the series by a FIFO: a worker reading it blocks until
    :func:`unblock` puts the real bytes back, so a test can kill it mid-job without racing it."""
    with sessions() as s:
        rel = s.scalars(select(Instance.path).order_by(Instance.id)).first()
    path = storage_dir / rel
    real = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return path, real


def unblock(path, real: bytes) -> None:
    tmp = path.with_suffix(".real")
    tmp.write_bytes(real)
    os.replace(tmp, path)  # readers opening it from now on see the file


def test_results_land_in_the_index_and_replace_earlier_ones(setup):
    _, cfg, sessions, ctx = setup
    store_files(ctx, sorted(J2K_SERIES.glob("*.dcm")))
    enqueue_all(sessions)
    state = state_for(cfg, sessions)
    assert worker.process_next(state) == "done"
    assert worker.process_next(state) is None  # nothing left

    with sessions() as s:
        series = s.scalars(select(Series)).one()
        results = list(s.scalars(select(SliceResult).order_by(SliceResult.position)))
        ranges = list(s.scalars(select(RegionRange).order_by(RegionRange.ordinal)))
        job = s.scalars(select(Job)).one()
        assert job.state == "done" and job.attempts == 1
        assert series.classification_state == "done"
        assert series.model_version.startswith("untrained-test-model") and series.classified_at is not None
        assert [r.position for r in results] == list(range(10))
        zs = [r.z_mm for r in results]
        assert zs == sorted(zs, reverse=True) and zs[0] == -394.0 and zs[-1] == -439.0  # top -> bottom
        for r in results:
            total = r.p_neck + r.p_lungs + r.p_liver + r.p_pelvis + r.p_legs + (r.p_head or 0.0) + (r.p_abdomen or 0.0)
            assert total == pytest.approx(1.0, abs=1e-4)  # head/abdomen: NULL where the model has no such class
            assert r.predicted in ("head", "neck", "lungs", "liver", "pelvis", "legs", "abdomen")
            assert r.body_parts and r.model_version == series.model_version
        # Ranges are in anatomical order, cover every slice and name the instances at their ends.
        assert ranges and ranges[0].first_position == 0 and ranges[-1].last_position == 9
        assert sum(r.n_slices for r in ranges) >= 10
        order = ["neck", "lungs", "liver", "pelvis", "legs"]
        assert [order.index(r.region) for r in ranges] == sorted(order.index(r.region) for r in ranges)
        assert series.body_parts == "\\".join(r.body_part for r in ranges)
        first = next(x for x in results if x.position == ranges[0].first_position)
        assert ranges[0].first_sop_instance_uid == first.instance.sop_instance_uid
        assert ranges[0].first_instance_number == 55 and ranges[-1].last_instance_number == 64

    # Classified again (a new job): the results are replaced, not added.
    with sessions() as s:
        jobs.enqueue_classification(s, s.scalars(select(Series)).one())
        s.commit()
    assert worker.process_next(state) == "done"
    assert count(sessions, SliceResult) == 10
    assert count(sessions, RegionRange) == len(ranges)


def test_out_of_scope_series_are_skipped_with_their_reason(setup):
    _, cfg, sessions, ctx = setup
    store_files(ctx, [CT_FIXTURES / "slices" / "barre_chest_scout_jpegll.dcm"])
    store_files(ctx, sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm")))
    assert len(enqueue_all(sessions)) == 2
    state = state_for(cfg, sessions)
    assert [worker.process_next(state), worker.process_next(state)] == ["skipped", "skipped"]
    with sessions() as s:
        reasons = {x.series_instance_uid: (x.classification_state, x.classification_reason)
                   for x in s.scalars(select(Series))}
        job_errors = sorted(j.error for j in s.scalars(select(Job)))
    assert reasons["1.2.840.113619.2.22.287.1.19990524.214221"][0] == "skipped"
    assert "LOCALIZER" in reasons["1.2.840.113619.2.22.287.1.19990524.214221"][1]
    assert reasons["1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"] == (
        "skipped", "3 slice(s), fewer than worker.min_slices=5")
    assert job_errors == sorted(r[1] for r in reasons.values())
    assert count(sessions, SliceResult) == 0


def corrupt_j2k(path) -> bytes:
    """A complete, well-formed dataset whose JPEG 2000 codestream header is zeroed."""
    data = bytearray(path.read_bytes())
    i = data.find(b"\xff\x4f\xff\x51")  # SOC + SIZ markers
    assert i > 0
    data[i:i + 64] = b"\x00" * 64
    return bytes(data)


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_pixel_data_that_does_not_decode_fails_at_once_with_the_reason(setup, read_path):
    _, cfg, sessions, ctx = setup
    cfg = with_batch(cfg, READ_PATHS[read_path])
    files = sorted(J2K_SERIES.glob("*.dcm"))
    store_files(ctx, files[:5] + [corrupt_j2k(files[5])] + files[6:])
    enqueue_all(sessions)
    state = state_for(cfg, sessions)
    assert worker.process_next(state) == "failed"  # permanent: no backoff retries that cannot help
    job = job_rows(sessions)[0]
    assert job.state == "failed" and job.attempts == 1
    assert "pixel data does not decode" in job.error and "No matching JPEG 2000 format" in job.error
    with sessions() as s:
        series = s.scalars(select(Series)).one()
        assert series.classification_state == "failed" and series.classification_reason == job.error
    assert count(sessions, SliceResult) == 0
    assert worker.process_next(state) is None
    state.close_reader_pool()


def test_inconsistent_geometry_fails_the_job_not_the_worker(setup):
    _, cfg, sessions, ctx = setup
    files = sorted(J2K_SERIES.glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["twin", ds.SOPInstanceUID])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    store_files(ctx, files + [buf.getvalue()])  # a second slice at the position of the first
    enqueue_all(sessions)
    state = state_for(cfg, sessions)
    assert worker.process_next(state) == "failed"
    job = job_rows(sessions)[0]
    assert job.attempts == 1 and "same position" in job.error
    with sessions() as s:
        assert "same position" in s.scalars(select(Series)).one().classification_reason


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_a_transient_error_is_retried_then_failed_after_max_attempts(setup, read_path):
    _, cfg, sessions, ctx = setup
    cfg = with_batch(cfg, READ_PATHS[read_path])
    store_files(ctx, sorted(J2K_SERIES.glob("*.dcm")))
    enqueue_all(sessions)
    with sessions() as s:
        victim = cfg.resolved_storage_dir / s.scalars(select(Instance.path)).first()
    victim.unlink()  # a missing file may come back (a restore, a remount): retried with backoff
    state = state_for(cfg, sessions)
    assert worker.process_next(state) == "queued"
    assert job_rows(sessions)[0].attempts == 1
    assert worker.process_next(state) == "failed"
    job = job_rows(sessions)[0]
    assert job.attempts == 2 and "No such file" in job.error
    state.close_reader_pool()


def test_a_series_read_in_reader_processes_gives_the_results_of_the_read_in_threads(setup):
    """More files than one batch: the job reads them once each in the worker's reader processes. They come
    from a fork server, so no runtime is mapped in them (this process has onnxruntime loaded), and what
    they give is what the read in threads gives."""
    _, cfg, sessions, ctx = setup
    store_files(ctx, sorted(J2K_SERIES.glob("*.dcm")))
    enqueue_all(sessions)
    in_threads = state_for(with_batch(cfg, READ_PATHS["threads"]), sessions)
    assert worker.process_next(in_threads) == "done"
    assert in_threads._readers is None, "one batch is read without reader processes"
    read_in_threads = stored_probabilities(sessions)

    state = state_for(with_batch(cfg, READ_PATHS["reader-processes"]), sessions)
    with sessions() as s:
        jobs.enqueue_classification(s, s.scalars(select(Series)).one())
        s.commit()
    try:
        assert worker.process_next(state) == "done"
        readers = [p.pid for p in state.reader_pool()._processes.values()]
        assert readers and os.getpid() not in readers
        for pid in readers:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "onnxruntime" not in maps and "libtorch" not in maps, f"reader {pid} maps a runtime"
    finally:
        state.close_reader_pool()
    assert all(process_ended(pid) for pid in readers)
    got = stored_probabilities(sessions)
    assert got.shape == read_in_threads.shape == (10, 7)
    np.testing.assert_allclose(got, read_in_threads, atol=1e-6)


def test_a_dead_reader_process_leaves_the_rest_to_threads_and_a_new_pool(setup, caplog):
    _, cfg, sessions, ctx = setup
    store_files(ctx, sorted(J2K_SERIES.glob("*.dcm")))
    enqueue_all(sessions)
    state = state_for(with_batch(cfg, READ_PATHS["reader-processes"]), sessions)
    pool = state.reader_pool()
    assert pool.submit(os.getpid).result() != os.getpid()  # a reader process is up
    for proc in list(pool._processes.values()):
        os.kill(proc.pid, signal.SIGKILL)
    try:
        assert worker.process_next(state) == "done"
        assert "reader process failed" in caplog.text
        assert state._readers is None, "the broken pool is dropped"
        assert count(sessions, SliceResult) == 10
        with sessions() as s:  # the next job gets new reader processes
            jobs.enqueue_classification(s, s.scalars(select(Series)).one())
            s.commit()
        assert worker.process_next(state) == "done"
        assert state._readers is not None and state._readers is not pool
    finally:
        state.close_reader_pool()


def long_series(n_copies: int, salt: str = "") -> list[bytes]:
    """A real 30-slice chest series stacked ``n_copies`` times along z (new UIDs, consistent geometry;
    ``salt`` also gives it a new SeriesInstanceUID)."""
    src = CHEST
    if not src.exists():
        pytest.skip(f"shared data {src} not present")
    files = sorted(src.glob("*.dcm"))
    out = []
    for k in range(n_copies):
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            if salt:
                ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, salt])
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SOPInstanceUID, str(k), salt])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k * len(files) + i + 1
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z - k * 8.0 * len(files)]
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out.append(buf.getvalue())
    return out


def test_a_killed_worker_leaves_the_job_to_be_claimed_after_the_lease(setup, tmp_path):
    config_path, cfg, sessions, ctx = setup
    if not cfg.resolved_database_url.startswith("sqlite"):
        pytest.skip("the kill test runs once, on SQLite")
    data = yaml.safe_load(config_path.read_text())
    data["worker"]["lease_s"] = 3600.0  # the lease runs out only when the test expires it in the database
    config_path.write_text(yaml.safe_dump(data))
    cfg = load_config(config_path)
    store_files(ctx, long_series(2))
    enqueue_all(sessions)
    fifo, real = block_one_file(sessions, cfg.resolved_storage_dir)
    log_path = tmp_path / "worker.log"
    proc = start_worker_process(config_path, log_path)
    try:
        def claimed_by_it():
            assert proc.poll() is None, log_path.read_text()
            job = job_rows(sessions)[0]
            return job.state == "running" and f":{proc.pid}:" in job.lease_owner

        wait_for(claimed_by_it, "the worker process to claim the job")
        def processes_with_readers():  # 60 files in batches of 16: read in reader processes, under a fork server
            below = descendants(proc.pid)
            return below if any(parent_pid(pid) not in (None, proc.pid) for pid in below) else None

        below = wait_for(processes_with_readers, "the worker's reader processes to start")
        # It cannot finish: a reader blocks reading the FIFO. Kill the worker mid-job, holding the lease.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # Its fork server and reader processes end with it, the one blocked on the FIFO too.
        wait_for(lambda: all(process_ended(pid) for pid in below), "the killed worker's reader processes to end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    unblock(fifo, real)
    killed = job_rows(sessions)[0]
    assert killed.state == "running" and killed.attempts == 1, "the killed worker must not have finished"
    assert count(sessions, SliceResult) == 0
    # Within the lease nobody else may take it...
    assert jobs.claim_next(sessions, "someone-else", cfg.worker.lease_s, max_attempts=2) is None
    # ...after it, another worker does and finishes it.
    expire_leases(sessions)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(cfg, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: job_rows(sessions)[0].state in ("done", "failed"), "the second worker to finish the job")
    finally:
        stop.set()
        thread.join(30)
    job = job_rows(sessions)[0]
    assert job.state == "done" and job.attempts == 2, job.error
    assert f":{proc.pid}:" not in job.lease_owner
    assert count(sessions, SliceResult) == 60
    with sessions() as s:
        zs = [r.z_mm for r in s.scalars(select(SliceResult).order_by(SliceResult.position))]
    assert zs[0] == 312.0 and zs[-1] == 312.0 - 59 * 8.0


def test_worker_process_stops_on_sigterm(setup, tmp_path):
    config_path, cfg, sessions, ctx = setup
    if not cfg.resolved_database_url.startswith("sqlite"):
        pytest.skip("the process test runs once, on SQLite")
    store_files(ctx, sorted(J2K_SERIES.glob("*.dcm")))
    enqueue_all(sessions)
    log_path = tmp_path / "worker.log"
    proc = start_worker_process(config_path, log_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and job_rows(sessions)[0].state != "done":
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        assert job_rows(sessions)[0].state == "done", log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "classified" in log and "stopped" in log
    assert count(sessions, SliceResult) == 10


def child_pids(pid: int) -> list[int]:
    out = []
    for task in (Path("/proc") / str(pid) / "task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def mapped_files(pid: int) -> str:
    return (Path("/proc") / str(pid) / "maps").read_text()


def holds_model(pid: int) -> bool:
    """Whether the process has loaded onnxruntime (a worker infers with the model's ONNX twin)."""
    return "onnxruntime" in mapped_files(pid)


def series_state(sessions, uid: str):
    with sessions() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == uid)).first()
    return series if series is not None and series.classification_state in ("done", "failed", "skipped") else None


def test_node_classifies_on_release_and_survives_its_worker_dying(setup, tmp_path):
    """`dicomnode serve` + DCMTK storescu: released -> complete after the grace (StableAge an hour) ->
    classified by the worker process; that process killed -9 is restarted, the listeners never notice."""
    config_path, cfg, sessions, _ = setup
    if not cfg.resolved_database_url.startswith("sqlite"):
        pytest.skip("the end-to-end node test runs once, on SQLite")
    if not CHEST.exists():
        pytest.skip(f"shared data {CHEST} not present")
    port = free_port()
    data = yaml.safe_load(config_path.read_text())
    data.update({"port": port, "stable_age_s": 3600.0})  # only the release signal can complete a series here
    data["listener"]["processes"] = 1
    data["worker"]["release_grace_s"] = 0.5
    data["http"] = {"enabled": False}
    config_path.write_text(yaml.safe_dump(data))
    log_path = tmp_path / "node.log"
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config_path)],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_echo(port, 60)
        sent = subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(CHEST)],
                              capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        chest_uid = str(pydicom.dcmread(sorted(CHEST.glob("*.dcm"))[0], stop_before_pixels=True).SeriesInstanceUID)
        series = wait_for(lambda: series_state(sessions, chest_uid), "the chest series to be classified")
        assert series.classification_state == "done", log_path.read_text()
        assert series.body_parts and series.model_version.startswith("untrained-test-model")

        children = child_pids(node.pid)
        workers = [p for p in children if holds_model(p)]
        assert len(workers) == 1, "one worker process holds the model; the listeners never import it"
        assert not any("libtorch" in mapped_files(p) for p in [node.pid, *children]), "no node process has torch"
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: "restarting it" in log_path.read_text(), "the node to restart its worker")
        wait_for_echo(port, 60)  # the listeners did not notice
        second = tmp_path / "second"
        second.mkdir()
        for i, raw in enumerate(long_series(1, "second")):
            (second / f"{i:03d}.dcm").write_bytes(raw)
        sent = subprocess.run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd",
                               str(second)], capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        uid2 = str(pydicom.dcmread(second / "000.dcm", stop_before_pixels=True).SeriesInstanceUID)
        series = wait_for(lambda: series_state(sessions, uid2), "the restarted worker to classify a series")
        assert series.classification_state == "done", log_path.read_text()
        restarted = [p for p in child_pids(node.pid) if holds_model(p)]
        assert len(restarted) == 1 and restarted != workers
    finally:
        assert stop_node(node, 30) == 0
    assert count(sessions, SliceResult) == 60
    assert "Traceback" not in log_path.read_text()


def test_a_stopping_worker_gives_its_job_back(setup):
    _, cfg, sessions, ctx = setup
    store_files(ctx, sorted(J2K_SERIES.glob("*.dcm")))
    enqueue_all(sessions)
    state = state_for(cfg, sessions)
    state.stop.set()  # asked to stop while it holds the job
    assert worker.process_next(state) == "queued"
    job = job_rows(sessions)[0]
    assert job.state == "queued" and job.attempts == 0 and job.lease_owner == ""
    assert count(sessions, SliceResult) == 0
    state.stop.clear()
    assert worker.process_next(state_for(cfg, sessions, "another")) == "done"


def test_a_worker_that_lost_its_lease_writes_nothing(setup):
    _, cfg, sessions, ctx = setup
    store_files(ctx, sorted(J2K_SERIES.glob("*.dcm")))
    enqueue_all(sessions)
    job = jobs.claim_next(sessions, "slow-worker", 3600)
    expire_leases(sessions)  # the slow worker's lease runs out (by the database's clock)
    other = jobs.claim_next(sessions, "fast-worker", 60)  # another worker takes the job over
    assert other is not None and other.id == job.id
    state = state_for(cfg, sessions, "slow-worker")
    assert worker.process_job(state, job) == "lost"  # the slow worker's results are dropped
    assert count(sessions, SliceResult) == 0
    assert job_rows(sessions)[0].lease_owner == "fast-worker"
    assert worker.process_job(state_for(cfg, sessions, "fast-worker"), other) == "done"
    assert count(sessions, SliceResult) == 10


def test_a_promoted_model_is_used_from_the_next_job_on(setup, tmp_path):
    _, cfg, sessions, _ = setup
    model_file = tmp_path / "promoted" / "model.pt"
    make_untrained_checkpoint(model_file, seed=1)
    cfg.model.path = str(model_file)
    state = state_for(cfg, sessions)
    first = state.model()
    assert state.model() is first and isinstance(first, OnnxModel)  # loaded once while the files are unchanged
    replacement = make_untrained_checkpoint(tmp_path / "candidate" / "model.pt", seed=2)
    os.replace(replacement, model_file)  # as `dicomnode promote` installs a model: atomic renames
    between = state.model()  # the new checkpoint beside the old twin: torch, never the stale twin
    assert isinstance(between, LoadedModel) and between.version.endswith("seed2")
    os.replace(onnx_twin_path(replacement), onnx_twin_path(model_file))
    second = state.model()
    assert isinstance(second, OnnxModel) and second.version.endswith("seed2") and first.version.endswith("seed1")
