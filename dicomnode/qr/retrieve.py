"""C-MOVE and C-GET: the instances an identifier selects, sent as stored.

:func:`move` and :func:`get` are plain generators in the shape pynetdicom's EVT_C_MOVE / EVT_C_GET
handlers yield (destination, number of sub-operations, then ``(status, dataset)`` per instance);
pynetdicom performs the C-STORE sub-operations and counts completed / failed / warning from the
peer's C-STORE responses, and answers the final status (0x0000, 0xB000 with the failed UIDs, 0xA702).

Files are read as stored and parsed without decoding the pixel data; pydicom writes the undecoded
elements back byte for byte, so the peer receives what the node received. Only when the peer accepted
no presentation context for a compressed file's transfer syntax (but did accept an uncompressed one)
is the file decompressed, so that it can be delivered at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config, RemoteAE
from dicomnode.qr.matching import QueryError
from dicomnode.qr.query import describe, dialect_of, query_level, retrieve_statement

log = logging.getLogger("dicomnode.qr.retrieve")

PENDING = 0xFF00
CANCEL = 0xFE00
MAX_SUBOPERATIONS = 65535  # Number of * Suboperations are US
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Match:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str


class RetrieveError(QueryError):
    """The retrieve cannot be done (bad identifier, too many instances); the message says why."""


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


def store_contexts(matches: list[Match]) -> list[PresentationContext]:
    """Contexts to propose to a move destination: one per (SOP class, stored transfer syntax), plus an
    uncompressed one per SOP class of compressed files (the fallback when the peer refuses compression)."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(sop_class: str, syntaxes: list[str]) -> None:
        key = (sop_class, tuple(syntaxes))
        if key not in seen and len(contexts) < MAX_CONTEXTS:
            seen.add(key)
            contexts.append(build_context(sop_class, syntaxes))

    for m in matches:
        ts = UID(m.transfer_syntax_uid or ExplicitVRLittleEndian)
        if ts.is_compressed:
            add(m.sop_class_uid, [str(ts)])
            add(m.sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        else:
            add(m.sop_class_uid, list(dict.fromkeys([str(ts), ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
    return contexts


def _failed(match: Match) -> Dataset:
    """A stand-in for an instance that cannot be read: its C-STORE fails and its UID is reported as failed."""
    ds = Dataset()
    ds.SOPInstanceUID = match.sop_instance_uid
    return ds


def load_instance(storage_dir: Path, match: Match, accepted: list[PresentationContext] | None) -> Dataset:
    """The stored file of ``match`` as a dataset (pixel data not decoded), fitted to the peer's contexts."""
    path = storage_dir / match.path
    try:
        ds = dcmread(path)
    except Exception as exc:  # missing or damaged file: this sub-operation fails, the others go on
        log.error("retrieve: stored file of %s unreadable (%s: %s); counted as a failed sub-operation",
                  match.sop_instance_uid, type(exc).__name__, exc)
        return _failed(match)
    if accepted:
        ts = UID(ds.file_meta.get("TransferSyntaxUID", ""))
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", match.sop_class_uid))
        mine = [cx for cx in accepted if cx.abstract_syntax == sop and cx.as_scu]
        exact = any(cx.transfer_syntax[0] == ts for cx in mine)
        plain = any(not UID(cx.transfer_syntax[0]).is_compressed for cx in mine)
        if ts.is_compressed and not exact and plain:
            try:
                ds.decompress(generate_instance_uid=False)  # same instance, only its encoding changes
                log.info("retrieve: %s decompressed (%s) because the peer accepted no context for it",
                         match.sop_instance_uid, ts.name)
            except Exception as exc:
                log.error("retrieve: %s could not be decompressed for the peer (%s: %s)",
                          match.sop_instance_uid, type(exc).__name__, exc)
                return _failed(match)
    return ds


def _send(matches: list[Match], storage_dir: Path, accepted: Callable[[], list[PresentationContext] | None],
          is_cancelled: Callable[[], bool], what: str) -> Iterator[tuple[int, Dataset | None]]:
    for i, match in enumerate(matches):
        if is_cancelled():
            log.info("%s cancelled after %d of %d sub-operation(s)", what, i, len(matches))
            yield CANCEL, None
            return
        yield PENDING, load_instance(storage_dir, match, accepted())


def move(cfg: Config, sessions: sessionmaker[Session], identifier: Dataset, destination_ae: str, *,
         root: str = "STUDY", storage_dir: Path | None = None, is_cancelled: Callable[[], bool] = lambda: False,
         accepted: Callable[[], list[PresentationContext] | None] = lambda: None,
         peer: str = "") -> Iterator[Any]:
    """The EVT_C_MOVE generator: (host, port, {contexts}) or (None, None) for an unknown destination,
    then the number of instances, then ``(0xFF00, dataset)`` per instance (``(0xFE00, None)`` on cancel).

    A bad identifier raises :class:`QueryError` before anything is yielded (pynetdicom answers 0xC514).
    """
    dest = find_destination(cfg, destination_ae)
    if dest is None:
        log.error("C-MOVE from %s refused (0xA801): move destination %r is unknown; register it in the config "
                  "under qr.move_destinations (- ae_title: %s, host: <address>, port: <port>) and restart the node",
                  peer, destination_ae, (destination_ae or "").strip() or "<AE title>")
        yield None, None
        return
    try:
        level, matches = select_matches(sessions, identifier, root)
    except QueryError as exc:
        log.warning("C-MOVE from %s to %s refused: %s", peer, dest.ae_title, exc)
        raise
    what = f"C-MOVE {describe(identifier, level)} from {peer} to {dest.ae_title}"
    log.info("%s: %d instance(s)", what, len(matches))
    yield dest.host, dest.port, {"contexts": store_contexts(matches)}
    yield len(matches)
    yield from _send(matches, storage_dir or cfg.resolved_storage_dir, accepted, is_cancelled, what)


def get(cfg: Config, sessions: sessionmaker[Session], identifier: Dataset, *, root: str = "STUDY",
        storage_dir: Path | None = None, is_cancelled: Callable[[], bool] = lambda: False,
        accepted: Callable[[], list[PresentationContext] | None] = lambda: None,
        peer: str = "") -> Iterator[Any]:
    """The EVT_C_GET generator: the number of instances, then ``(0xFF00, dataset)`` per instance.

    A bad identifier raises :class:`QueryError` before anything is yielded (pynetdicom answers 0xC413).
    """
    try:
        level, matches = select_matches(sessions, identifier, root)
    except QueryError as exc:
        log.warning("C-GET from %s refused: %s", peer, exc)
        raise
    what = f"C-GET {describe(identifier, level)} from {peer}"
    log.info("%s: %d instance(s)", what, len(matches))
    yield len(matches)
    yield from _send(matches, storage_dir or cfg.resolved_storage_dir, accepted, is_cancelled, what)
