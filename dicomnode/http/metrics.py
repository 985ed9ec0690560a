"""Prometheus metrics of every process of the node, added up across processes.

The node runs several listener processes and a worker (a thread of ``serve``, or ``dicomnode worker``
processes). Counters and histograms that a process records (C-STOREs, associations, jobs, durations) use
prometheus_client's multiprocess mode: each process writes its values to memory-mapped files in
``<data_dir>/metrics/`` and ``/metrics`` merges them, so the counts of all processes add up and a
restarted listener's counts are kept. What the index already holds (queue depth by state, instances,
series by classification state) is read from the database at scrape time instead, so it is right for
every process and machine sharing that index (:mod:`dicomnode.http.collectors`).

:func:`setup` is called once per process before anything is recorded: by ``serve`` (which also removes
the files of processes of an earlier run) and by ``dicomnode worker``; listener processes inherit the
folder from ``serve``'s environment and set themselves up on first use. Until then (a test calling
``store_instance`` directly, ``dicomnode classify``) every hook is a no-op.

The hooks are what the receive path and the worker call, one line each. They never raise: a metric that
cannot be recorded is logged once and dropped, and never makes a C-STORE or a job fail. This module does
not import torch; prometheus_client is imported only by :func:`setup`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.http import events

log = logging.getLogger("dicomnode.http.metrics")

#: Environment variable through which ``serve`` hands the metrics folder to its listener processes.
ENV_DIR = "DICOMNODE_METRICS_DIR"
#: prometheus_client reads its multiprocess folder from this variable when it opens a process's files.
PROM_ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"

#: Histogram buckets (seconds): a job or classification takes a second to a few minutes; from the last
#: slice to the result adds StableAge (default 60 s) and the queue.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
LATENCY_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 1800, 3600, 7200)


@dataclass
class _Metrics:
    folder: Path
    instances_received: Any
    cstore_responses: Any
    associations: Any
    jobs_finished: Any
    job_duration: Any
    classification_duration: Any
    last_slice_to_result: Any


_state: _Metrics | None = None
_lock = threading.Lock()
_warned: set[str] = set()


def metrics_dir(data_dir: str | os.PathLike[str]) -> Path:
    """The folder of the per-process metric files under ``data_dir``."""
    return Path(data_dir) / "metrics"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_files(folder: Path) -> int:
    """Remove the metric and event files of processes that are no longer running (an earlier run of the
    node); the files of live processes (a ``dicomnode worker`` started before ``serve``) are kept.
    Returns how many files were removed."""
    removed = 0
    for path in list(folder.glob("*.db")) + list(folder.glob("events-*.json")):
        pid_part = path.stem.rsplit("_", 1)[-1].rsplit("-", 1)[-1]
        if pid_part.isdigit() and int(pid_part) != os.getpid() and not _pid_alive(int(pid_part)):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def setup(data_dir: str | os.PathLike[str], fresh: bool = False) -> Path:
    """Record this process's metrics under ``<data_dir>/metrics`` (multiprocess mode); returns the folder.

    ``fresh`` (``serve`` at start): first remove the files of processes that are gone. The folder is put
    into the environment, so processes started afterwards (the listener processes) record there too.
    """
    global _state
    folder = metrics_dir(data_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with _lock:
        if fresh:
            removed = remove_stale_files(folder)
            if removed:
                log.info("removed %d metric file(s) of an earlier run from %s", removed, folder)
        os.environ[ENV_DIR] = str(folder)
        os.environ[PROM_ENV_DIR] = str(folder)
        if _state is not None and _state.folder == folder:
            return folder
        from prometheus_client import Counter, Histogram, values

        # Metrics created from now on write to this folder, even when prometheus_client was imported
        # before the variable was set (it picks its value class once, at import).
        values.ValueClass = values.MultiProcessValue()
        _state = _Metrics(
            folder=folder,
            instances_received=Counter("dicomnode_instances_received", "Instances received and stored (C-STORE "
                                       "answered Success, duplicates kept included)", registry=None),
            cstore_responses=Counter("dicomnode_cstore_responses", "C-STORE requests answered, by DIMSE status "
                                     "code", ["status"], registry=None),
            associations=Counter("dicomnode_associations", "Associations requested, by outcome (accepted, "
                                 "rejected) and the reason of a rejection", ["outcome", "reason"], registry=None),
            jobs_finished=Counter("dicomnode_jobs_finished", "Queue jobs a worker ran, by kind and the state "
                                  "it left them in", ["kind", "outcome"], registry=None),
            job_duration=Histogram("dicomnode_job_duration_seconds", "Time a worker spent on one job, by kind "
                                   "and outcome", ["kind", "outcome"], buckets=DURATION_BUCKETS, registry=None),
            classification_duration=Histogram("dicomnode_classification_duration_seconds", "Classification "
                                              "of one series: decode, preprocessing, inference, regions "
                                              "(the job's duration adds headers and the store)",
                                              buckets=DURATION_BUCKETS, registry=None),
            last_slice_to_result=Histogram("dicomnode_last_slice_to_result_seconds", "From the last instance "
                                           "of a series received to its classification stored (StableAge, "
                                           "queue wait and classification)", buckets=LATENCY_BUCKETS,
                                           registry=None),
        )
        _warned.clear()
    return folder


def reset() -> None:
    """Stop recording in this process (``serve`` on its way out, tests)."""
    global _state
    with _lock:
        if _state is not None:
            from prometheus_client import values

            values.ValueClass = values.MutexValue  # metrics created later in this process stay in memory
        _state = None
        os.environ.pop(ENV_DIR, None)
        os.environ.pop(PROM_ENV_DIR, None)


def _metrics() -> _Metrics | None:
    """This process's metrics: set up on first use from the folder ``serve`` put in the environment."""
    if _state is None:
        folder = os.environ.get(ENV_DIR)
        if not folder:
            return None
        setup(Path(folder).parent)
    return _state


def _dropped(what: str, exc: BaseException) -> None:
    if what not in _warned:  # once per process and kind, so a broken folder does not flood the log
        _warned.add(what)
        log.warning("metric %s not recorded (%s: %s); further failures of it are not logged", what,
                    type(exc).__name__, exc)


def _event(m: _Metrics, kind: str, assoc: Any, **fields: Any) -> None:
    """List an event for the page, naming the peer of ``assoc``; a field may be a callable giving its value.
    A failure is logged (once) and the count goes on."""
    try:
        ae = getattr(getattr(assoc.requestor, "primitive", None), "calling_ae_title", None) or assoc.requestor.ae_title
        values = {k: v() if callable(v) else v for k, v in fields.items()}
        events.record(m.folder, kind, calling_ae_title=str(ae).strip(), address=str(assoc.requestor.address),
                      **values)
    except Exception as exc:
        _dropped(f"{kind} event", exc)


# Hooks ---------------------------------------------------------------------------------------------

def cstore(status: int, event: Any = None) -> int:
    """A C-STORE was answered with ``status`` (``event``: its pynetdicom event, for the peer of a refusal).
    Returns ``status``."""
    m = _metrics()
    if m is None:
        return status
    try:
        if status == 0:
            m.instances_received.inc()
        elif event is not None:  # listed first, so that whoever sees the count finds the event too
            _event(m, "cstore_refused", event.assoc, status=f"0x{status:04X}",
                   sop_instance_uid=lambda: str(event.request.AffectedSOPInstanceUID))
        m.cstore_responses.labels(status=f"0x{status:04X}").inc()
    except Exception as exc:
        _dropped("cstore", exc)
    return status


def association_accepted() -> None:
    """An association was accepted."""
    m = _metrics()
    if m is None:
        return
    try:
        m.associations.labels(outcome="accepted", reason="").inc()
    except Exception as exc:
        _dropped("association", exc)


def association_rejected(assoc: Any, reason: str | None = None) -> None:
    """An association was rejected; ``reason`` None: pynetdicom rejected it itself (the reason is worked
    out from the request: called AE title, or its own association limit)."""
    m = _metrics()
    if m is None:
        return
    try:
        if reason is None:
            called = str(assoc.requestor.primitive.called_ae_title).strip()
            reason = ("called_ae_title_not_recognised" if assoc.ae.require_called_aet
                      and called != str(assoc.ae.ae_title).strip() else "rejected_by_pynetdicom")
        _event(m, "association_rejected", assoc, reason=reason)
        m.associations.labels(outcome="rejected", reason=reason).inc()
    except Exception as exc:
        _dropped("association", exc)


def job_finished(kind: str, outcome: str | None, started: float) -> str | None:
    """A worker finished running one job of ``kind`` that it started at ``started`` (``time.monotonic()``)
    and left in state ``outcome`` (done, skipped, queued, failed, lost). Returns ``outcome``."""
    m = _metrics()
    if m is None or outcome is None:
        return outcome
    try:
        m.jobs_finished.labels(kind=kind, outcome=outcome).inc()
        m.job_duration.labels(kind=kind, outcome=outcome).observe(max(0.0, time.monotonic() - started))
    except Exception as exc:
        _dropped("job", exc)
    return outcome


def classified(seconds: float, last_received_at: dt.datetime | None) -> None:
    """A series was classified in ``seconds``; its last instance had arrived at ``last_received_at`` (naive
    UTC, as the index stores it)."""
    m = _metrics()
    if m is None:
        return
    try:
        m.classification_duration.observe(seconds)
        if last_received_at is not None:
            now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            m.last_slice_to_result.observe(max(0.0, (now - last_received_at).total_seconds()))
    except Exception as exc:
        _dropped("classification", exc)
