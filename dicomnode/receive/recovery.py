"""Storage is the source of truth: start-up recovery, the index check and the index rebuild.

An instance file is fsynced, then renamed into place inside its index transaction, just before the
commit. A crash of the process (``kill -9``) can leave a temporary ``.incoming-*.part`` file, or, for
the instant of the commit, a file whose index row was never committed. A power loss with the default
``listener.power_loss_safe: false`` can take more: SQLite (synchronous=NORMAL) may lose the last
commits, so complete, fsynced, acknowledged files can be left without their rows, and a rename not
yet journalled leaves the fsynced ``.part`` instead of the ``.dcm``.

So recovery never deletes an instance: every complete file (``.dcm``, or ``.part`` that passes the
structural check of :mod:`dicomnode.part10`) that the index lacks is re-indexed (the
``.part`` renamed into place first); only a torn ``.part`` is removed. Rows whose file is missing are
reported (logged by SOP Instance UID), not deleted. At start only series folders written since the
previous start are scanned (their modification time is at least that of the start marker), so a
restart stays fast on a large archive; :func:`check_storage` (``dicomnode db check``) compares all of
it, and ``dicomnode db rebuild`` runs :func:`recover_storage` over every folder into an empty index.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.index import Outcome, StoredFile, index_instance_cached
from dicomnode.db.models import Instance, Series, Study
from dicomnode.receive import storage
from dicomnode.receive.headers import UndecodableDataset, read_header

log = logging.getLogger("dicomnode.receive.recovery")

START_MARKER = ".dicomnode-last-start"
#: Seconds of slack on folder modification times (coarse file-system clocks).
MTIME_SLACK_S = 2.0
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".incoming-", ".part"
#: A study folder being deleted by retention or ``dicomnode delete`` (see dicomnode.receive.retention).
DELETING_PREFIX = ".deleting-"
#: At most this many UIDs are named in one log line.
_NAMED = 20


@dataclass
class RecoveryReport:
    folders_scanned: int = 0
    partial_files_removed: int = 0
    #: complete .part files renamed into place and indexed
    partial_files_reindexed: int = 0
    #: complete .dcm files the index lacked, indexed again
    files_reindexed: int = 0
    #: files that are not a decodable instance of their folder (left alone), relative paths
    files_not_indexable: list[str] = field(default_factory=list)
    #: SOP Instance UIDs of index rows (in the folders scanned) whose file is missing
    missing_files: list[str] = field(default_factory=list)


def is_partial(name: str) -> bool:
    return name.startswith(PARTIAL_PREFIX) and name.endswith(PARTIAL_SUFFIX)


def series_folders(storage_dir: Path, since: float | None = None) -> Iterator[os.DirEntry]:
    """Every ``<study>/<series>`` folder of storage (modified at or after ``since``, epoch seconds)."""
    if not storage_dir.is_dir():
        return
    for study in os.scandir(storage_dir):
        if not study.is_dir() or study.name.startswith("."):
            continue
        for series in os.scandir(study.path):
            if not series.is_dir():
                continue
            if since is not None and series.stat().st_mtime < since - MTIME_SLACK_S:
                continue
            yield series


def _series_rows(session: Session, series_uid: str) -> dict[str, str]:
    """path -> SOP Instance UID of the rows of one series."""
    return dict(session.execute(
        select(Instance.path, Instance.sop_instance_uid).join(Series, Instance.series_fk == Series.id)
        .where(Series.series_instance_uid == series_uid)).all())


def reindex_file(sessions: sessionmaker[Session], storage_dir: Path, rel: str, data: bytes,
                 series_ids: dict[str, int], replace: bool = False) -> Outcome | None:
    """Index the instance file at ``storage_dir/rel`` (its bytes ``data``); None when the bytes are not
    a complete instance whose UIDs name this path (such a file is left alone and logged)."""
    try:
        header = read_header(data)
        expected = storage.relative_path(header.study_instance_uid, header.series_instance_uid,
                                         header.sop_instance_uid)
    except (UndecodableDataset, storage.InvalidUID) as exc:
        log.warning("recovery: %s is not a complete instance (%s); left alone", rel, exc)
        return None
    if expected != rel:
        log.warning("recovery: %s holds instance %s, whose path is %s; left alone", rel,
                    header.sop_instance_uid, expected)
        return None
    return index_instance_cached(sessions, header, StoredFile(rel, len(data)), series_ids, replace=replace)


def _recover_partial(sessions: sessionmaker[Session], storage_dir: Path, folder: str, entry: os.DirEntry,
                     series_ids: dict[str, int], replace: bool, report: RecoveryReport) -> None:
    """A ``.part``: publish and index it when it is a complete instance of its folder, else remove it.

    Where the target exists, it stays (``keep``/``reject``) or the ``.part`` replaces it (``replace``:
    a ``.part`` outlives its rename only when the rename had not reached the disk, so it is newer).
    """
    with open(entry.path, "rb") as fh:
        data = fh.read()
    try:
        header = read_header(data)
        rel = storage.relative_path(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    except (UndecodableDataset, storage.InvalidUID):
        rel = None
    if rel is None or rel.rsplit("/", 1)[0] != folder:
        os.unlink(entry.path)
        report.partial_files_removed += 1
        return
    target = storage_dir / rel
    if target.exists() and not replace:
        os.unlink(entry.path)  # the published file wins (it is the same data or the first copy)
        report.partial_files_removed += 1
        return
    os.replace(entry.path, target)
    outcome = index_instance_cached(sessions, header, StoredFile(rel, len(data)), series_ids, replace=True)
    report.partial_files_reindexed += 1
    log.warning("recovery: %s %s from a complete temporary file (a C-STORE interrupted after its fsync)",
                header.sop_instance_uid, "re-indexed" if outcome == "new" else "replaced")


def recover_storage(storage_dir: Path, sessions: sessionmaker[Session], since: float | None,
                    duplicate_policy: str = "keep", progress: Callable[[int], object] | None = None) -> RecoveryReport:
    """Make the index hold every complete instance file of the series folders modified at or after
    ``since`` (epoch seconds; None = every folder): re-index what it lacks, publish complete ``.part``
    files, remove torn ones, report rows whose file is missing. ``progress(n)``: n files were handled."""
    report = RecoveryReport()
    replace = duplicate_policy == "replace"
    series_ids: dict[str, int] = {}
    for series in series_folders(storage_dir, since):
        report.folders_scanned += 1
        folder = f"{Path(series.path).parent.name}/{series.name}"
        with sessions() as session:
            rows = _series_rows(session, series.name)
        seen: set[str] = set()
        handled = 0
        for entry in sorted(os.scandir(series.path), key=lambda e: e.name):
            handled += 1
            if is_partial(entry.name):
                _recover_partial(sessions, storage_dir, folder, entry, series_ids, replace, report)
            elif entry.name.endswith(".dcm") and entry.is_file():
                rel = f"{folder}/{entry.name}"
                seen.add(rel)
                if rel in rows:
                    continue
                with open(entry.path, "rb") as fh:
                    data = fh.read()
                outcome = reindex_file(sessions, storage_dir, rel, data, series_ids)
                if outcome == "new":
                    report.files_reindexed += 1
                elif outcome is None:
                    report.files_not_indexable.append(rel)
        for rel, uid in rows.items():
            if rel not in seen and not (storage_dir / rel).exists():  # a .part published just now exists
                report.missing_files.append(uid)
        if progress is not None:
            progress(handled)
    _log_report(report)
    return report


def _log_report(report: RecoveryReport) -> None:
    if report.files_reindexed or report.partial_files_reindexed:
        log.warning("recovery: re-indexed %d instance file(s) and %d complete temporary file(s) the index lacked "
                    "(acknowledged instances whose index commit was lost, or never acknowledged ones)",
                    report.files_reindexed, report.partial_files_reindexed)
    if report.partial_files_removed:
        log.warning("recovery: removed %d torn temporary file(s) (C-STOREs interrupted before Success)",
                    report.partial_files_removed)
    if report.missing_files:
        log.error("recovery: %d index row(s) without their file (run 'dicomnode db check'): %s",
                  len(report.missing_files), ", ".join(report.missing_files[:_NAMED]))


def finish_deletions(storage_dir: Path, sessions: sessionmaker[Session]) -> None:
    """At start: finish (or undo) the deletions a crash interrupted (``.deleting-*`` study folders)."""
    if not storage_dir.is_dir():
        return
    for entry in os.scandir(storage_dir):
        if not (entry.is_dir() and entry.name.startswith(DELETING_PREFIX)):
            continue
        study_uid = entry.name[len(DELETING_PREFIX):]
        with sessions() as session:
            indexed = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
        target = storage_dir / study_uid
        if indexed is not None and not target.exists():
            os.replace(entry.path, target)
            log.warning("study %s: its deletion was interrupted before the index commit; kept", study_uid)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("study %s: finished its interrupted deletion", study_uid)


def recover_at_start(data_dir: Path, storage_dir: Path, sessions: sessionmaker[Session],
                     duplicate_policy: str = "keep") -> RecoveryReport:
    """Recover the folders written since the previous start, then stamp this start."""
    marker = data_dir / START_MARKER
    since = marker.stat().st_mtime if marker.exists() else None
    finish_deletions(storage_dir, sessions)
    report = recover_storage(storage_dir, sessions, since, duplicate_policy)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()  # its modification time is this start
    return report


@dataclass
class CheckReport:
    """Index against storage: what differs (relative paths); empty lists = they agree."""

    instances_indexed: int = 0
    files_found: int = 0
    unindexed_files: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    #: study folders a deletion left (``.deleting-*``; finished at the next start)
    pending_deletions: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not (self.unindexed_files or self.missing_files or self.partial_files or self.pending_deletions)


def check_storage(storage_dir: Path, sessions: sessionmaker[Session]) -> CheckReport:
    """Compare every index row with every file of storage; reads only, changes nothing."""
    report = CheckReport()
    with sessions() as session:
        indexed = set(session.scalars(select(Instance.path)))
    report.instances_indexed = len(indexed)
    found: set[str] = set()
    if storage_dir.is_dir():
        report.pending_deletions = sorted(e.name for e in os.scandir(storage_dir)
                                          if e.is_dir() and e.name.startswith(DELETING_PREFIX))
    for series in series_folders(storage_dir):
        folder = f"{Path(series.path).parent.name}/{series.name}"
        for entry in os.scandir(series.path):
            rel = f"{folder}/{entry.name}"
            if is_partial(entry.name):
                report.partial_files.append(rel)
            elif entry.name.endswith(".dcm"):
                found.add(rel)
    report.files_found = len(found)
    report.unindexed_files = sorted(found - indexed)
    report.missing_files = sorted(indexed - found)
    report.partial_files.sort()
    return report
