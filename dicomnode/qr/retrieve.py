"""C-MOVE and C-GET: which instances an identifier selects, where they go, and the sub-operations.

:func:`select_matches` turns an identifier into the stored instances it selects (the standard unique
keys, or the node's extension: any matchable key such as ``BodyPartExamined`` at IMAGE level);
:func:`find_destination` looks a move destination up in the config; :func:`suboperations` sends the
matches one by one over an established association with :func:`dicomnode.qr.transfer.send_stored`
(byte for byte where the peer accepted the stored transfer syntax, transcoded otherwise) and yields each
result. The DIMSE side (responses, counts, final status) is :mod:`dicomnode.qr.service`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config, RemoteAE
from dicomnode.qr.matching import QueryError
from dicomnode.qr.query import dialect_of, query_level, retrieve_statement
from dicomnode.qr.transfer import send_stored

log = logging.getLogger("dicomnode.qr.retrieve")

MAX_SUBOPERATIONS = 65535  # Number of * Suboperations are US

#: C-STORE response statuses counted as warnings (PS3.4 B.2.3); any other non-zero status is a failure.
STORE_WARNINGS = {0x0001, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Match:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str


class RetrieveError(QueryError):
    """The retrieve cannot be done (bad identifier, too many instances); the message says why."""


@dataclass
class Counts:
    """Sub-operation counts of one retrieve (PS3.4 C.4.2.1.6 - C.4.2.1.9) and the failed SOP Instance UIDs."""

    total: int = 0
    completed: int = 0
    warning: int = 0
    failed: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.warning - self.failed

    def add(self, match: Match, status: int) -> None:
        if status == 0x0000:
            self.completed += 1
        elif status in STORE_WARNINGS:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(match.sop_instance_uid)

    def fail_remaining(self, matches: list[Match]) -> None:
        """Count every sub-operation not yet done as failed (it could not be performed)."""
        for m in matches[self.total - self.remaining:]:
            self.add(m, 0xA702)


def find_destination(cfg: Config, ae_title: str) -> RemoteAE | None:
    """The configured move destination called ``ae_title`` (trailing spaces ignored), or None."""
    wanted = (ae_title or "").strip()
    for dest in cfg.qr.move_destinations:
        if dest.ae_title.strip() == wanted:
            return dest
    return None


def select_matches(sessions: sessionmaker[Session], identifier: Dataset, root: str) -> tuple[str, list[Match]]:
    """The level of ``identifier`` and the instances it selects; raises :class:`QueryError` when it is unusable."""
    level = query_level(identifier, root)
    with sessions() as session:
        rows = session.execute(retrieve_statement(identifier, level, dialect_of(session))).all()
    if len(rows) > MAX_SUBOPERATIONS:
        raise RetrieveError("identifier", f"selects {len(rows)} instances; one retrieve moves at most "
                                          f"{MAX_SUBOPERATIONS} (retrieve by series)")
    return level, [Match(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid, r.path) for r in rows]


def suboperations(assoc: Any, matches: list[Match], storage_dir: Path, counts: Counts, *,
                  is_cancelled: Callable[[], bool] = lambda: False, originator_ae: str | None = None,
                  originator_msg_id: int | None = None) -> Iterator[tuple[Match, int]]:
    """C-STORE each match over ``assoc`` in order, counting into ``counts``; yields (match, C-STORE status).

    Stops before the next sub-operation when ``is_cancelled()`` is true (the caller answers Cancel with
    the remaining count). An unreadable stored file fails its own sub-operation only.
    """
    for match in matches:
        if is_cancelled():
            return
        status = send_stored(assoc, storage_dir / match.path, match.sop_class_uid, match.sop_instance_uid,
                             match.transfer_syntax_uid, originator_ae=originator_ae,
                             originator_msg_id=originator_msg_id)
        counts.add(match, status)
        yield match, status
