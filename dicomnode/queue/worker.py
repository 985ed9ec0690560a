"""The classification worker: claim a job, classify its series, store the results; repeat until stopped.

Runs in supervised processes of ``dicomnode serve`` (``worker.processes``, at ``worker.nice``) or as its
own process (``dicomnode worker``); any number may share one index (SQLite on one machine, PostgreSQL on
several).

Between jobs (``worker.early``) the worker classifies slices while their series is still arriving: batches
of newly indexed CT instances of series in state ``receiving`` are read once each (header and pixels, from
the files just written, still in the page cache) and inferred; their headers and probabilities are kept in
memory (:class:`EarlyCache`). A full batch (``worker.batch_size``) is followed by the next at once; after a
partial one the worker waits a poll interval, so that slices still arriving make a fuller batch (each look
costs index queries, and one slice inferred at a time costs ~30% more CPU per slice). When the series completes (:mod:`dicomnode.queue.stability`), its job only
reads the headers of the slices it does not hold, orders them, classifies what is missing and decodes the
regions. The cache is an optimisation only: an entry counts only for the same instance row, file and size,
and a job on another worker (or after a restart) classifies everything itself, with the same result.

Per job:

1. claim it with a lease (:func:`dicomnode.queue.jobs.claim_next`); a keeper thread extends the lease every
   third of ``worker.lease_s`` while the job runs, so a worker that dies leaves its job to be claimed
   again once the lease has expired, and a worker whose lease was taken over stops and writes nothing;
2. read the headers of the series' files, decide scope and order (:mod:`dicomnode.classification.imaging.series`); an
   out-of-scope series ends ``skipped`` with its reason;
3. classify (:mod:`dicomnode.classification.pipeline`; the model is loaded once per worker, on the first job, from
   ``model.path`` or the shipped default, on ``worker.device``: on the CPU the checkpoint's ONNX twin
   on onnxruntime, so a worker process never imports torch; torch on CUDA, available under ``auto``;
   see :mod:`dicomnode.classification.model.runtime`);
4. in one transaction, checking the lease is still held: replace the series' slice results and region
   ranges, and set ``Series.body_parts`` (backslash-joined Body Part Examined terms), ``model_version`` and
   ``classified_at``; then mark the job done.

A permanent error (a slice that does not decode, inconsistent geometry, mixed sizes: ``ValueError`` from
reading, planning or classifying the series) ends the job ``failed`` at once with the reason. Any other
error (a missing file, a model that does not load, a database error) goes back to the queue with
exponential backoff and ends ``failed`` after ``worker.max_attempts`` claims, the error kept on the job and
the series; a job whose worker was killed counts too (:func:`dicomnode.queue.jobs.claim_next`). The worker
itself never dies of a job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.queue import jobs
from dicomnode.config import Config
from dicomnode.db.models import Instance, Job, RegionRange, Series, SliceResult, utcnow
from dicomnode.http import metrics
from dicomnode.db.clock import db_utcnow
from dicomnode.results import runner as results_runner
from dicomnode.results.jobs import configured as results_configured, enqueue_after_classification

log = logging.getLogger("dicomnode.queue.worker")

#: Reader processes per worker for a series' files (the series job; the early path reads in the worker).
READER_PROCESSES = 2


class LeaseLost(RuntimeError):
    """Another worker holds the job now; this worker's results are dropped."""


class ModelUnavailable(RuntimeError):
    """The model did not load: an environment problem, retried with backoff (not a fault of the series)."""


class EarlyCache:
    """Slices classified before their series completed: instance row id -> (path, size, model, slice).

    Bounded (oldest entries dropped first); an entry counts only for the same file, size and model.
    """

    def __init__(self, max_slices: int = 50_000) -> None:
        self.max_slices = max_slices
        self.entries: OrderedDict[int, tuple[str, int, str, object]] = OrderedDict()
        #: highest instance row id looked at; newer rows are the next early batch
        self.watermark = 0

    def put(self, instance: Instance, model_version: str, early) -> None:
        self.entries[instance.id] = (instance.path, instance.size_bytes, model_version, early)
        self.entries.move_to_end(instance.id)
        while len(self.entries) > self.max_slices:
            self.entries.popitem(last=False)

    def get(self, instance: Instance, model_version: str):
        """The :class:`dicomnode.classification.pipeline.EarlySlice` of ``instance``, or None."""
        entry = self.entries.get(instance.id)
        if entry is None or entry[:3] != (instance.path, instance.size_bytes, model_version):
            return None
        return entry[3]


@dataclass
class WorkerState:
    """What one worker keeps between jobs: config, index sessions, its lease owner name, the model."""

    cfg: Config
    sessions: sessionmaker[Session]
    owner: str
    stop: threading.Event
    _model: object | None = field(default=None, repr=False)
    _model_stamp: tuple | None = field(default=None, repr=False)
    #: The last series this worker classified (a :class:`dicomnode.classification.pipeline.SeriesClassification`, whose
    #: ``timings`` include reading the headers and storing the results); for monitoring and benchmarks.
    last_result: object | None = field(default=None, repr=False)
    early: EarlyCache = field(default_factory=EarlyCache, repr=False)
    _readers: object | None = field(default=None, repr=False)

    def reader_pool(self):
        """The reader processes that read, decode and preprocess a series' files for this worker (started on
        first use, kept between jobs), or None where there is no fork server (then threads read).

        They come from a fork server (a fresh interpreter), not forked from this process: a loaded
        runtime's thread pools are never copied into them, and they never import torch or onnxruntime.
        They inherit the worker's niceness and end when the worker ends, even killed -9 while a reader is
        blocked reading a file (:func:`dicomnode.lifetime.helper_started`); their fork server ends after them."""
        if self._readers is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from dicomnode.lifetime import helper_started

            # No fork server here, or a daemonic process, which may not have children: threads read.
            if "forkserver" not in multiprocessing.get_all_start_methods() or multiprocessing.current_process().daemon:
                return None
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["dicomnode.classification.pipeline"])
            self._readers = ProcessPoolExecutor(READER_PROCESSES, mp_context=context, initializer=helper_started,
                                                initargs=(os.getpid(),))
        return self._readers

    def close_reader_pool(self) -> None:
        """Stop the reader processes (a new pool is made when next needed)."""
        pool, self._readers = self._readers, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def model(self):
        """The classification model (``model.path`` or the shipped default), loaded on first use and
        loaded again when its checkpoint file or its ONNX twin was replaced (``dicomnode promote`` replaces
        both atomically), so a promoted model is used from the next job on."""
        from dicomnode.classification.model import node_model_path, onnx_twin_path

        # Resolved before every job: a model promoted into <data_dir>/models/ while model.path was empty
        # is found without a restart (see node_model_path).
        path = node_model_path(self.cfg.model.path or None, self.cfg.resolved_data_dir)
        stamp = tuple(_file_stamp(p) for p in (path, onnx_twin_path(path)))
        if self._model is None or stamp != self._model_stamp:
            from dicomnode.classification.model import load_inference_model

            self._model = load_inference_model(path, self.cfg.worker.device, self.cfg.worker.threads)
            self._model_stamp = stamp
            log.info("worker %s loaded model %s (%s) on %s", self.owner, self._model.version, path,
                     self._model.device)
        return self._model


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of a file, None when it is missing (loading then says why)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def default_owner() -> str:
    """Lease owner name of this worker: host, process and thread."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class _LeaseKeeper:
    """Extends a job's lease in the background; ``cancel`` is set when the lease is lost or on stop."""

    def __init__(self, state: WorkerState, job_id: int) -> None:
        self.state, self.job_id = state, job_id
        self.cancel = threading.Event()
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dicomnode-lease-{job_id}", daemon=True)

    def _run(self) -> None:
        lease_s = self.state.cfg.worker.lease_s
        interval = max(0.05, lease_s / 3.0)
        next_extend = time.monotonic() + interval
        while not self._done.wait(min(0.2, interval)):
            if self.state.stop.is_set():
                self.cancel.set()
                return
            if time.monotonic() < next_extend:
                continue
            next_extend = time.monotonic() + interval
            try:
                held = jobs.extend_lease(self.state.sessions, self.job_id, self.state.owner, lease_s)
            except Exception as exc:  # the database may be briefly unavailable; try again next time
                log.warning("job %d: could not extend the lease: %s", self.job_id, exc)
                continue
            if not held:
                log.warning("job %d: lease lost to another worker; stopping this attempt", self.job_id)
                self.lost = True
                self.cancel.set()
                return

    def __enter__(self) -> "_LeaseKeeper":
        if self.state.stop.is_set():
            self.cancel.set()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(5)


def _series_files(sessions: sessionmaker[Session], series_id: int) -> tuple[Series | None, list[Instance]]:
    with sessions() as s:
        series = s.get(Series, series_id)
        instances = list(s.scalars(select(Instance).where(Instance.series_fk == series_id)))
        return series, instances


def _scan_series(state: WorkerState, instances: list[Instance], known: dict, model, cancel: threading.Event):
    """Read every stored file of a series that was not classified as it arrived, once each: returns
    (headers of every file in instance order, probabilities per SOP Instance UID, the read's timings).
    ``known``: instance id -> early slice (header and probabilities already in memory).

    The files go through a :class:`dicomnode.classification.pipeline.FileScan` (headers and
    probabilities from one read), on the worker's reader processes when there is more than one batch.
    A file whose header does not read fails the job with the ValueError of
    :func:`dicomnode.classification.imaging.series.read_headers`: it names the file and keeps the cause,
    which tells a missing file (retried) from a broken one (permanent)."""
    from dicomnode.classification.imaging.series import read_headers
    from dicomnode.classification.pipeline import FileScan

    cfg = state.cfg
    todo = [inst for inst in instances if inst.id not in known]
    paths = [cfg.resolved_storage_dir / inst.path for inst in todo]
    batch = cfg.worker.batch_size
    scan = FileScan(paths, model.preprocess, batch, pool=state.reader_pool() if len(paths) > batch else None)
    try:
        scanned = scan.collect(model, cancel)
    finally:
        if scan.pool_broken:
            state.close_reader_pool()
    per_file = {inst.id: (read_headers(path) if isinstance(hs, str) else hs)
                for inst, (path, hs) in zip(todo, scanned.headers)}
    headers = [h for inst in instances for h in ([known[inst.id].header] if inst.id in known else per_file[inst.id])]
    probabilities = {e.header.sop_instance_uid: e.probabilities for e in known.values()}
    probabilities.update(scanned.probabilities)
    return headers, probabilities, scanned.timings


def _add_scan_timings(timings, scan) -> None:
    """Fold the timings of the file read (:func:`_scan_series`) into a series' timings: the pass counts
    as ``headers_s`` (headers and most probabilities come from it), its stages add to the others."""
    timings.headers_s += scan.total_s
    for name in ("read_decode_s", "preprocess_s", "infer_s", "wait_s"):
        setattr(timings, name, getattr(timings, name) + getattr(scan, name))


def classify_arrivals(state: WorkerState) -> int:
    """Classify the next batch of newly indexed CT instances of series still receiving; returns how many
    files were looked at (0: nothing new). Their headers and probabilities go to ``state.early``."""
    from dicomnode.classification.pipeline import classify_files

    cfg = state.cfg
    cache = state.early
    with state.sessions() as s:
        rows = list(s.scalars(
            select(Instance).join(Series, Series.id == Instance.series_fk)
            .where(Instance.id > cache.watermark, Series.state == "receiving", Series.modality == "CT")
            .order_by(Instance.id).limit(cfg.worker.batch_size)))
        if not rows:  # move the watermark past rows of other series, so the next look starts later
            top = s.scalar(select(Instance.id).order_by(Instance.id.desc()).limit(1))
            cache.watermark = max(cache.watermark, top or 0)
            return 0
    cache.watermark = rows[-1].id
    model = state.model()
    storage = cfg.resolved_storage_dir
    for inst, early in zip(rows, classify_files([storage / r.path for r in rows], model, cancel=state.stop)):
        if early is not None:
            cache.put(inst, model.version, early)
    return len(rows)


def store_results(sessions: sessionmaker[Session], job_id: int, owner: str, series_id: int, result,
                  instance_ids: dict[str, int]) -> None:
    """Replace the series' results with ``result`` in one transaction, if ``owner`` still holds the job.

    ``result`` None removes earlier results (the series is now out of scope).
    """
    from dicomnode.classification.model import BODY_PARTS

    now = utcnow()
    with sessions.begin() as s:
        held = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
                         .values(updated_at=now)).rowcount
        if held != 1:
            raise LeaseLost(f"job {job_id} is no longer held by {owner}")
        s.execute(delete(SliceResult).where(SliceResult.series_fk == series_id))
        s.execute(delete(RegionRange).where(RegionRange.series_fk == series_id))
        if result is None:
            s.execute(update(Series).where(Series.id == series_id).values(body_parts="", model_version="",
                                                                           classified_at=None))
            return
        rows = []
        for sl in result.slices:
            p = sl.probabilities
            rows.append(dict(
                instance_fk=instance_ids[sl.sop_instance_uid], series_fk=series_id, model_version=result.model_version,
                position=sl.position, z_mm=sl.z_mm, p_neck=p.get("neck", 0.0), p_lungs=p.get("lungs", 0.0),
                p_liver=p.get("liver", 0.0), p_pelvis=p.get("pelvis", 0.0), p_legs=p.get("legs", 0.0),
                p_head=p.get("head"), p_abdomen=p.get("abdomen"),
                predicted=sl.predicted, body_parts="\\".join(BODY_PARTS.get(r, r.upper()) for r in sl.regions)))
        if rows:
            s.execute(insert(SliceResult), rows)
        ranges = [dict(
            series_fk=series_id, ordinal=i, region=r.region, body_part=r.body_part,
            first_instance_number=r.first_instance, last_instance_number=r.last_instance,
            first_sop_instance_uid=r.first_sop_instance_uid, last_sop_instance_uid=r.last_sop_instance_uid,
            first_position=r.first_position, last_position=r.last_position, z_start_mm=r.z_start_mm,
            z_end_mm=r.z_end_mm, n_slices=r.n_slices, mean_probability=r.mean_probability,
            model_version=result.model_version) for i, r in enumerate(result.regions)]
        if ranges:
            s.execute(insert(RegionRange), ranges)
        s.execute(update(Series).where(Series.id == series_id).values(
            body_parts="\\".join(result.body_parts), model_version=result.model_version, classified_at=now))


def _release(sessions: sessionmaker[Session], job_id: int, owner: str) -> None:
    """Give a held job back to the queue at once (worker stopping); the attempt is not counted."""
    with sessions.begin() as s:
        released = s.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(state="queued", lease_owner="", lease_expires_at=None, attempts=Job.attempts - 1,
                    not_before=db_utcnow(), updated_at=db_utcnow())).rowcount
        if released:
            series_id = s.scalar(select(Job.series_fk).where(Job.id == job_id))
            s.execute(update(Series).where(Series.id == series_id).values(classification_state="queued"))


def process_job(state: WorkerState, job: Job) -> str:
    """Run one claimed job to its end; returns the job's new state (done, skipped, queued, failed, lost)."""
    from dicomnode.classification.pipeline import Cancelled, classify_plan
    from dicomnode.classification.imaging.series import plan_series

    cfg = state.cfg
    with _LeaseKeeper(state, job.id) as keeper:
        try:
            series, instances = _series_files(state.sessions, job.series_fk)
            if series is None or not instances:
                jobs.finish(state.sessions, job.id, state.owner, "skipped", "series has no stored instances")
                return "skipped"
            uid = series.series_instance_uid
            t0 = time.perf_counter()
            try:
                model = state.model()
            except Exception as exc:
                raise ModelUnavailable(f"the model did not load: {type(exc).__name__}: {exc}") from exc
            known = {}
            if cfg.worker.early:
                for inst in instances:
                    early = state.early.get(inst, model.version)
                    if early is not None:
                        known[inst.id] = early
            headers, probabilities, scan_timings = _scan_series(state, instances, known, model, keeper.cancel)
            plan = plan_series(headers, cfg.worker.min_slices)
            if plan.in_scope and any(h.frame is not None for h in plan.slices):
                plan.skip_reason = ("multi-frame (Enhanced CT) instances: per-frame results are not stored in the "
                                    "index; classify them offline with `dicomnode classify`")
            if not plan.in_scope:
                log.info("job %d: series %s skipped: %s", job.id, uid, plan.skip_reason)
                store_results(state.sessions, job.id, state.owner, series.id, None, {})
                jobs.finish(state.sessions, job.id, state.owner, "skipped", plan.skip_reason)
                return "skipped"
            result = classify_plan(plan, model, batch_size=cfg.worker.batch_size, cancel=keeper.cancel,
                                   known=probabilities)
            _add_scan_timings(result.timings, scan_timings)
            result.timings.total_s = time.perf_counter() - t0
            ids = {inst.sop_instance_uid: inst.id for inst in instances}
            t0 = time.perf_counter()
            store_results(state.sessions, job.id, state.owner, series.id, result, ids)
            result.timings.store_s = time.perf_counter() - t0
            state.last_result = result
            if not jobs.finish(state.sessions, job.id, state.owner, "done"):
                return "lost"
            if results_configured(cfg):  # issue 14: SR/KOS and routing jobs of this classification
                enqueue_after_classification(state.sessions, cfg, series.id)
            log.info("job %d: series %s classified: %d slices (%d classified as they arrived), %s, model %s "
                     "(%.2f s)", job.id, uid, result.n_slices, len(known),
                     " ".join(f"{r.region}[{r.first_position}-{r.last_position}]" for r in result.regions) or "-",
                     result.model_version, result.timings.total_s)
            metrics.classified(result.timings.total_s, series.last_received_at)
            return "done"
        except (Cancelled, LeaseLost) as exc:
            if keeper.lost or isinstance(exc, LeaseLost):
                log.warning("job %d: %s; results dropped", job.id, exc)
                return "lost"
            _release(state.sessions, job.id, state.owner)
            log.info("job %d: worker stopping; job returned to the queue", job.id)
            return "queued"
        except Exception as exc:  # anything a series or the environment throws ends on the job, not the worker
            error = str(exc) if isinstance(exc, (ValueError, OSError, ModelUnavailable)) \
                else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (ValueError, OSError, ModelUnavailable)):
                log.exception("job %d: unexpected error", job.id)
            # The series' data (pixels that do not decode, geometry, sizes) fails the same way every time.
            # A file that cannot be opened (wrapped in a ValueError naming it) may come back: not permanent.
            permanent = isinstance(exc, ValueError) and not isinstance(exc.__cause__, OSError)
            try:
                return jobs.fail(state.sessions, job.id, state.owner, error, cfg.worker.max_attempts,
                                 cfg.worker.retry_backoff_s, permanent=permanent)
            except Exception as db_exc:
                log.error("job %d: could not record the failure (%s): %s", job.id, db_exc, error)
                return "lost"


def process_next(state: WorkerState) -> str | None:
    """Claim and run one job; None when no job is runnable."""
    job = jobs.claim_next(state.sessions, state.owner, state.cfg.worker.lease_s,
                          max_attempts=state.cfg.worker.max_attempts)
    if job is None:
        return None
    log.info("job %d claimed (series id %d, attempt %d)", job.id, job.series_fk, job.attempts)
    started = time.monotonic()
    return metrics.job_finished(job.kind, process_job(state, job), started)


def run(cfg: Config, stop: threading.Event, sessions: sessionmaker[Session] | None = None) -> None:
    """Claim and run classification jobs until ``stop`` is set.

    ``sessions``: the index's session factory of the calling process (the node passes its own, one
    engine per process); None opens the index here (``dicomnode worker``).
    """
    engine = None
    if sessions is None:
        from dicomnode.db.session import open_index

        try:
            engine, sessions = open_index(cfg)
        except Exception as exc:
            log.error("worker cannot open the index: %s", exc)
            return
    state = WorkerState(cfg, sessions, default_owner(), stop)
    log.info("worker %s started (lease %.0f s, batch %d, device %s)", state.owner, cfg.worker.lease_s,
             cfg.worker.batch_size, cfg.worker.device)
    if results_configured(cfg):  # issue 14: the results and forward jobs run beside the classification
        results_runner.start(cfg, stop, sessions, state.owner)
    if cfg.worker.early:  # load the model now, not when the first series arrives
        try:
            state.model()
        except Exception as exc:  # the job that needs it reports the error
            log.error("worker %s: the model did not load: %s", state.owner, exc)
    try:
        while not stop.is_set():
            try:
                outcome = process_next(state)
                if outcome is None and cfg.worker.early:
                    # A full batch: look again at once. A partial one: wait a poll interval, so that the
                    # slices still arriving make the next batch (small batches cost more CPU per slice).
                    outcome = "early" if classify_arrivals(state) >= cfg.worker.batch_size else None
            except Exception as exc:  # e.g. the database is unreachable: wait and try again
                if stop.is_set():  # early classification cancelled by the stop
                    break
                log.error("worker: %s", exc)
                outcome = None
            if outcome is None:
                stop.wait(cfg.worker.poll_interval_s)
    finally:
        state.close_reader_pool()
        if engine is not None:
            engine.dispose()
        log.info("worker %s stopped", state.owner)
