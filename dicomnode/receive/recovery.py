"""Start-up recovery: remove what an interrupted C-STORE left in storage.

An instance file is renamed into place inside its index transaction, just before the commit. A crash
(power loss, ``kill -9``) can therefore leave a temporary ``.incoming-*.part`` file, or, for the instant
of the commit, a file whose index row was never committed. Neither was acknowledged to the peer, which
sends it again. At start the node removes both, so storage holds only complete, indexed instances.

Only series folders written since the previous start are scanned (their modification time is at
least that of the start marker), so a restart stays fast on a large archive.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Series

log = logging.getLogger("dicomnode.receive.recovery")

START_MARKER = ".dicomnode-last-start"
#: Seconds of slack on folder modification times (coarse file-system clocks).
MTIME_SLACK_S = 2.0


@dataclass
class RecoveryReport:
    folders_scanned: int = 0
    partial_files_removed: int = 0
    unindexed_files_removed: int = 0


def _series_paths(session: Session, series_uid: str) -> set[str]:
    return set(session.scalars(
        select(Instance.path).join(Series, Instance.series_fk == Series.id)
        .where(Series.series_instance_uid == series_uid)))


def recover_storage(storage_dir: Path, sessions: sessionmaker[Session], since: float | None) -> RecoveryReport:
    """Remove temporary and unindexed files from series folders modified at or after ``since`` (epoch
    seconds; None = every folder). Returns what was done."""
    report = RecoveryReport()
    if not storage_dir.is_dir():
        return report
    with sessions() as session:
        for study in os.scandir(storage_dir):
            if not study.is_dir() or study.name.startswith("."):
                continue
            for series in os.scandir(study.path):
                if not series.is_dir():
                    continue
                if since is not None and series.stat().st_mtime < since - MTIME_SLACK_S:
                    continue
                report.folders_scanned += 1
                indexed = None
                for entry in os.scandir(series.path):
                    if entry.name.startswith(".incoming-") and entry.name.endswith(".part"):
                        os.unlink(entry.path)
                        report.partial_files_removed += 1
                    elif entry.name.endswith(".dcm"):
                        if indexed is None:
                            indexed = _series_paths(session, series.name)
                        if f"{study.name}/{series.name}/{entry.name}" not in indexed:
                            os.unlink(entry.path)
                            report.unindexed_files_removed += 1
                            log.warning("removed %s: written by a C-STORE interrupted before its index commit "
                                        "(never acknowledged; the peer sends it again)", entry.name[:-4])
    return report


def recover_at_start(data_dir: Path, storage_dir: Path, sessions: sessionmaker[Session]) -> RecoveryReport:
    """Recover the folders written since the previous start, then stamp this start."""
    marker = data_dir / START_MARKER
    since = marker.stat().st_mtime if marker.exists() else None
    report = recover_storage(storage_dir, sessions, since)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()  # its modification time is this start
    if report.partial_files_removed or report.unindexed_files_removed:
        log.warning("recovery: removed %d partial and %d unindexed file(s) in %d series folder(s)",
                    report.partial_files_removed, report.unindexed_files_removed, report.folders_scanned)
    return report
