"""What ``/metrics`` says: the per-process counters merged, and gauges read from the index at scrape time.

Queue depth, instances and series are in the index already, so they are read there (one query each)
rather than counted by processes: right for every listener, worker and machine sharing the index.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Job, Series, Study

log = logging.getLogger("dicomnode.http.collectors")

JOB_STATES = ("queued", "running", "done", "failed", "skipped", "cancelled")
CLASSIFICATION_STATES = ("none", "queued", "running", "done", "failed", "skipped")


class IndexCollector:
    """Gauges from the index: jobs by kind and state, series by classification state, studies, instances."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self):  # no description up front: collect() queries the database
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        with self.sessions() as s:
            jobs = s.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
            series = dict(s.execute(select(Series.classification_state, func.count())
                                    .group_by(Series.classification_state)).all())
            n_instances = s.scalar(select(func.count()).select_from(Instance)) or 0
            n_studies = s.scalar(select(func.count()).select_from(Study)) or 0
        queue = GaugeMetricFamily("dicomnode_queue_jobs", "Jobs in the durable queue, by kind and state",
                                  labels=["kind", "state"])
        by_kind: dict[str, dict[str, int]] = {"classify": {}}
        for kind, state, n in jobs:
            by_kind.setdefault(kind, {})[state] = n
        for kind, states in sorted(by_kind.items()):
            for state in sorted(set(JOB_STATES) | set(states)):
                queue.add_metric([kind, state], states.get(state, 0))
        yield queue
        per_state = GaugeMetricFamily("dicomnode_index_series", "Series in the index, by classification state",
                                      labels=["classification_state"])
        for state in sorted(set(CLASSIFICATION_STATES) | set(series)):
            per_state.add_metric([state], series.get(state, 0))
        yield per_state
        yield GaugeMetricFamily("dicomnode_index_instances", "Instances in the index", value=n_instances)
        yield GaugeMetricFamily("dicomnode_index_studies", "Studies in the index", value=n_studies)


def exposition(folder: Path, sessions: sessionmaker[Session]) -> tuple[bytes, str]:
    """The Prometheus text exposition of every process's metrics in ``folder`` and the index's gauges;
    returns (body, content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    registry.register(IndexCollector(sessions))
    return generate_latest(registry), CONTENT_TYPE_LATEST
