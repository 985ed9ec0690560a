"""The loop that runs the results and forward jobs: claim (:func:`dicomnode.queue.jobs.claim_next`, with
the ``worker.lease_s`` lease and ``worker.max_attempts``), run (:func:`dicomnode.results.jobs.process_job`),
repeat until stopped. It runs as a thread beside each classification worker (:func:`dicomnode.queue.worker.run`)
when the config has result destinations or routing rules.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config
from dicomnode.queue import jobs
from dicomnode.results.jobs import KINDS, process_job

log = logging.getLogger("dicomnode.results.runner")


def process_next(cfg: Config, sessions: sessionmaker[Session], owner: str) -> str | None:
    """Claim and run one results or forward job; None when none is runnable."""
    for kind in KINDS:
        job = jobs.claim_next(sessions, owner, cfg.worker.lease_s, kind=kind, max_attempts=cfg.worker.max_attempts)
        if job is not None:
            return process_job(cfg, sessions, job, owner)
    return None


def run(cfg: Config, stop: threading.Event, sessions: sessionmaker[Session], owner: str) -> None:
    """Run results and forward jobs until ``stop`` is set; never raises."""
    owner = f"{owner}:results"
    log.info("results runner %s started", owner)
    while not stop.is_set():
        try:
            outcome = process_next(cfg, sessions, owner)
        except Exception as exc:  # e.g. the database is unreachable: wait and try again
            log.error("results runner: %s", exc)
            outcome = None
        if outcome is None:
            stop.wait(cfg.worker.poll_interval_s)
    log.info("results runner %s stopped", owner)


def start(cfg: Config, stop: threading.Event, sessions: sessionmaker[Session], owner: str) -> threading.Thread:
    """Start :func:`run` as a daemon thread."""
    thread = threading.Thread(target=run, args=(cfg, stop, sessions, owner), name="dicomnode-results", daemon=True)
    thread.start()
    return thread
