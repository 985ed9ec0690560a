"""The job kinds of the results: ``results`` (SR and KOS to one destination) and ``forward`` (one routing rule).

:func:`enqueue_after_classification` runs when a series' classification was stored. It raises the
series' ``results_version``, cancels the still queued results/forward jobs of older versions, and queues
one ``results`` job per ``results.destinations`` entry and one ``forward`` job per routing rule that fires.
Each job's ``payload`` (JSON) names the version and the destination (and the rule), so the job is
complete by itself. A job that runs after a newer classification of its series ends ``skipped``
("superseded").

Re-classification policy: each classification is a new version; its SR and KOS are new instances (new
SOP Instance UIDs, derived from the series UID and the version; Instance Number = the version) in the
same result series as the earlier versions, so a PACS shows the newest as the highest instance of that
series. A retried job sends the very same UIDs again. Forwards are sent again for a new version (a CAD
that already has a slice receives it once more, with the same SOP Instance UID).

Retries: :func:`dicomnode.queue.jobs.fail` with ``worker.max_attempts`` and ``worker.retry_backoff_s``
(an unreachable destination, a refused instance); a series without what a job needs (a region without a
code, unreadable files) fails at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config, RemoteAE, RoutingRule
from dicomnode.db.models import Job, Series
from dicomnode.queue import jobs
from dicomnode.db.clock import db_utcnow
from dicomnode.results.content import SeriesResults, load_series_results
from dicomnode.results.routing import routed_slices, rule_fires
from dicomnode.results.send import SendError, send_datasets, send_slices

log = logging.getLogger("dicomnode.results.jobs")

RESULTS = "results"
FORWARD = "forward"
KINDS = (RESULTS, FORWARD)


def configured(cfg: Config) -> bool:
    """True when the config asks for result documents or has routing rules."""
    wants_documents = cfg.results.enabled and (cfg.results.structured_report or cfg.results.key_objects)
    return bool((wants_documents and cfg.results.destinations) or cfg.routing.rules)


def _remote(d: dict) -> RemoteAE:
    return RemoteAE(ae_title=d["ae_title"], host=d["host"], port=int(d["port"]))


def _new_job(kind: str, series_id: int, payload: dict) -> Job:
    now = db_utcnow()
    return Job(kind=kind, series_fk=series_id, state="queued", payload=json.dumps(payload, sort_keys=True),
               not_before=now, created_at=now, updated_at=now)


def enqueue_in(session: Session, cfg: Config, series_id: int) -> list[Job]:
    """Queue the results and forward jobs of a series just classified, in ``session`` (not committed)."""
    series = session.get(Series, series_id)
    if series is None:
        return []
    version = (series.results_version or 0) + 1
    series.results_version = version
    session.execute(
        update(Job).where(Job.series_fk == series_id, Job.kind.in_(KINDS), Job.state == "queued")
        .values(state="cancelled", error=f"superseded by results version {version}", updated_at=db_utcnow()))
    added: list[Job] = []
    if cfg.results.enabled and (cfg.results.structured_report or cfg.results.key_objects):
        for dest in cfg.results.destinations:
            added.append(_new_job(RESULTS, series_id, {"version": version, "destination": vars(dest)}))
    if cfg.routing.rules:
        session.flush()
        results = load_series_results(session, series_id)
        for i, rule in enumerate(cfg.routing.rules):
            if results is not None and rule_fires(rule, results):
                added.append(_new_job(FORWARD, series_id, {
                    "version": version, "rule": i, "region": rule.region, "destination": vars(rule.destination),
                    "margin_slices": rule.margin_slices, "min_slices": rule.min_slices}))
    session.add_all(added)
    session.flush()
    return added


def enqueue_after_classification(sessions: sessionmaker[Session], cfg: Config, series_id: int) -> int:
    """The worker's hook once a classification is stored: queue its results and forward jobs.

    Returns how many jobs were queued; never raises (a failure is logged: the classification stands).
    """
    try:
        with sessions.begin() as session:
            added = enqueue_in(session, cfg, series_id)
            summary = ", ".join(f"{j.kind} {json.loads(j.payload)['destination']['ae_title']}" for j in added)
    except Exception as exc:
        log.error("series id %d: results and forward jobs not queued: %s: %s", series_id, type(exc).__name__, exc)
        return 0
    if added:
        log.info("series id %d: queued %s", series_id, summary)
    return len(added)


def _load(sessions: sessionmaker[Session], cfg: Config, job: Job, payload: dict,
          headers: bool) -> SeriesResults | str:
    """The series' results for ``job``, or why the job has nothing to do (superseded, unclassified)."""
    with sessions() as session:
        version = session.scalar(select(Series.results_version).where(Series.id == job.series_fk))
        if version is None:
            return "the series was deleted"
        if version != payload["version"]:
            return f"superseded by results version {version}"
        results = load_series_results(session, job.series_fk, cfg.resolved_storage_dir if headers else None)
    return results if results is not None else "the series is no longer classified"


def build_documents(cfg: Config, results: SeriesResults) -> list:
    """The SR (``results.structured_report``) and one KOS per region (``results.key_objects``)."""
    from dicomnode.results.kos import build_kos
    from dicomnode.results.sr import build_sr

    docs = []
    if cfg.results.structured_report and results.regions:
        docs.append(build_sr(results, cfg.ae_title))
    if cfg.results.key_objects:
        for region in dict.fromkeys(r.region for r in results.regions):
            docs.append(build_kos(results, region, cfg.ae_title))
    return docs


def run_results_job(cfg: Config, sessions: sessionmaker[Session], job: Job) -> str:
    """Send the SR and KOS of ``job``'s series to its destination; returns a one-line outcome.

    Raises :class:`SendError` (retry) or ``ValueError`` (the series cannot give valid documents).
    """
    payload = json.loads(job.payload)
    results = _load(sessions, cfg, job, payload, headers=True)
    if isinstance(results, str):
        raise _Skip(results)
    dest = _remote(payload["destination"])
    docs = build_documents(cfg, results)
    if not docs:
        raise _Skip("no regions: no documents to send")
    send_datasets(cfg, dest, docs)
    return f"{len(docs)} document(s) of version {results.version} to {dest.ae_title}"


def _lease_keeper(cfg: Config, sessions: sessionmaker[Session], job: Job) -> Callable[[], bool]:
    """A callback that extends ``job``'s lease every third of ``worker.lease_s``; False once it is lost."""
    interval = cfg.worker.lease_s / 3.0
    last = [time.monotonic()]

    def keep_alive() -> bool:
        if time.monotonic() - last[0] < interval:
            return True
        last[0] = time.monotonic()
        return jobs.extend_lease(sessions, job.id, job.lease_owner, cfg.worker.lease_s)

    return keep_alive


def run_forward_job(cfg: Config, sessions: sessionmaker[Session], job: Job) -> str:
    """C-STORE the slices ``job``'s routing rule selects to its destination; returns a one-line outcome."""
    payload = json.loads(job.payload)
    results = _load(sessions, cfg, job, payload, headers=False)
    if isinstance(results, str):
        raise _Skip(results)
    rule = RoutingRule(region=payload["region"], destination=_remote(payload["destination"]),
                       margin_slices=payload["margin_slices"], min_slices=payload["min_slices"])
    slices = routed_slices(rule, results)
    if not slices:
        raise _Skip(f"no {rule.region} slices (at least {rule.min_slices}) in this version")
    send_slices(cfg, rule.destination, slices, _lease_keeper(cfg, sessions, job))
    return f"{len(slices)} {rule.region} slice(s) (margin {rule.margin_slices}) to {rule.destination.ae_title}"


class _Skip(Exception):
    """The job has nothing to do; it ends ``skipped`` with this reason."""


RUNNERS = {RESULTS: run_results_job, FORWARD: run_forward_job}


def process_job(cfg: Config, sessions: sessionmaker[Session], job: Job, owner: str) -> str:
    """Run one claimed results or forward job to its end; returns its new state (done, skipped, queued,
    failed, lost). Never raises."""
    try:
        outcome = RUNNERS[job.kind](cfg, sessions, job)
    except _Skip as skip:
        log.info("job %d (%s, series id %d) skipped: %s", job.id, job.kind, job.series_fk, skip)
        return "skipped" if jobs.finish(sessions, job.id, owner, "skipped", str(skip)) else "lost"
    except Exception as exc:
        permanent = isinstance(exc, (ValueError, KeyError)) and not isinstance(exc, SendError)
        if not isinstance(exc, (SendError, ValueError, KeyError, OSError)):
            log.exception("job %d (%s): unexpected error", job.id, job.kind)
        try:
            return jobs.fail(sessions, job.id, owner, f"{type(exc).__name__}: {exc}", cfg.worker.max_attempts,
                             cfg.worker.retry_backoff_s, permanent=permanent)
        except Exception as db_exc:
            log.error("job %d: could not record the failure (%s): %s", job.id, db_exc, exc)
            return "lost"
    log.info("job %d (%s, series id %d): sent %s", job.id, job.kind, job.series_fk, outcome)
    return "done" if jobs.finish(sessions, job.id, owner, "done", "") else "lost"
