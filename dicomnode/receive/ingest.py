"""Receive one instance: check it, write it durably, index it, and say which DIMSE status to answer.

:func:`store_instance` is what the C-STORE handler calls; it needs no network, so tests call it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.receive import storage
from dicomnode.config import Config
from dicomnode.db.index import StoredFile, index_instance_cached, instance_exists
from dicomnode.receive.headers import InstanceHeader, UndecodableDataset, read_header

log = logging.getLogger("dicomnode.receive.ingest")

# C-STORE statuses (PS3.4 B.2.3; 0xCxxx "cannot understand" codes are ours, documented in README).
from dicomnode.dicom_status import (  # the C-STORE statuses (re-exported)
    CANNOT_DECODE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_REJECTED,
    INDEX_FAILED,
    INVALID_UID,
    OUT_OF_RESOURCES,
    SUCCESS,
)


@dataclass
class NodeContext:
    """What the handlers of one process share: the configuration and the index's session factory."""

    config: Config
    sessions: sessionmaker[Session]
    #: SeriesInstanceUID -> series row id, filled by the index's fast path (one per process).
    series_ids: dict[str, int] = field(default_factory=dict, repr=False)

    @cached_property
    def storage_dir(self) -> Path:
        return self.config.resolved_storage_dir  # resolved once: resolve() costs syscalls per call

    @cached_property
    def file_mode(self) -> int:
        """``listener.file_mode`` as a number (validated by the config loader)."""
        return int(self.config.listener.file_mode, 8)


def check_received(encoded: bytes, calling_ae_title: str = "", expected_sop_class_uid: str | None = None,
                   expected_sop_instance_uid: str | None = None) -> InstanceHeader | int:
    """Read the header of received Part 10 bytes and check it against the C-STORE request.

    Returns the header, or the refusal status (logged, naming the instance by UID): 0xC210 the dataset
    does not decode, 0xC220 a required UID is missing or invalid, 0xA900 its SOP Class / Instance UID
    differs from the request's. Used by the node's C-STORE handler and by the miner's storage SCP.
    """
    try:
        header: InstanceHeader = read_header(encoded)
    except UndecodableDataset as exc:
        log.warning("C-STORE from %s refused (0x%04X): %s", calling_ae_title, CANNOT_DECODE, exc)
        return CANNOT_DECODE
    except storage.InvalidUID as exc:
        log.warning("C-STORE from %s refused (0x%04X): %s", calling_ae_title, INVALID_UID, exc)
        return INVALID_UID
    uid = header.sop_instance_uid
    if expected_sop_class_uid and header.sop_class_uid != expected_sop_class_uid:
        log.warning("C-STORE %s from %s refused (0x%04X): dataset SOPClassUID %s != request's %s", uid,
                    calling_ae_title, DATASET_DOES_NOT_MATCH_SOP_CLASS, header.sop_class_uid, expected_sop_class_uid)
        return DATASET_DOES_NOT_MATCH_SOP_CLASS
    if expected_sop_instance_uid and uid != expected_sop_instance_uid:
        log.warning("C-STORE %s from %s refused (0x%04X): dataset SOPInstanceUID differs from the request's %s",
                    uid, calling_ae_title, DATASET_DOES_NOT_MATCH_SOP_CLASS, expected_sop_instance_uid)
        return DATASET_DOES_NOT_MATCH_SOP_CLASS
    return header


def store_instance(ctx: NodeContext, encoded: bytes, calling_ae_title: str = "",
                   expected_sop_class_uid: str | None = None,
                   expected_sop_instance_uid: str | None = None) -> int:
    """Store the Part 10 bytes ``encoded`` (preamble + meta + dataset as received); return the status.

    Success is returned only after the file is fsynced, renamed into place and its index row committed.
    A duplicate SOP Instance UID is found by the index's unique constraint in the same transaction as
    the insert (no separate existence check, so two associations sending the same UID at the same
    moment cannot both pass it): ``keep`` leaves the first stored bytes and answers Success, ``reject``
    answers 0xC230 to all but the first, ``replace`` publishes each copy in its commit's order (the
    last writer wins) and logs it.
    """
    cfg = ctx.config.listener
    header = check_received(encoded, calling_ae_title, expected_sop_class_uid, expected_sop_instance_uid)
    if isinstance(header, int):
        return header
    uid = header.sop_instance_uid
    replace = cfg.duplicate_policy == "replace"

    rel = storage.relative_path(header.study_instance_uid, header.series_instance_uid, uid)
    try:
        storage.check_free_space(ctx.storage_dir, len(encoded), cfg.min_free_space_mb << 20)
        staged = storage.stage_file(ctx.storage_dir, rel, encoded, fsync=cfg.fsync,
                                    sync_folder=cfg.power_loss_safe, mode=ctx.file_mode)
    except OSError as exc:  # OutOfSpace included; ENOSPC while writing lands here too
        if not replace and instance_exists(ctx.sessions, uid):  # a duplicate needs no space
            return _duplicate(cfg.duplicate_policy, uid, calling_ae_title)
        log.error("C-STORE %s from %s refused (0x%04X): %s", uid, calling_ae_title, OUT_OF_RESOURCES, exc)
        return OUT_OF_RESOURCES

    def publish() -> None:
        if replace:
            staged.publish(replace=True)
            return
        try:
            staged.publish(replace=False)  # link(): never over a file another writer published
        except FileExistsError:
            # The row insert succeeded, so no committed row has this UID: the file in the way is one the
            # index lost (a crash or power loss after its rename; start-up recovery re-indexes those).
            log.warning("C-STORE %s from %s: an unindexed file had its name; replaced by the new copy",
                        uid, calling_ae_title)
            staged.publish(replace=True)

    # The fsynced file is renamed into place inside the index transaction, right before its commit: a
    # crash leaves no file, or (for the few microseconds of the commit) a file whose row is not yet
    # committed, never a row without its file.
    try:
        outcome = index_instance_cached(ctx.sessions, header, StoredFile(rel, len(encoded), calling_ae_title),
                                        ctx.series_ids, before_commit=publish, replace=replace)
    except OSError as exc:  # the rename into place failed; the transaction was rolled back
        log.error("C-STORE %s from %s refused (0x%04X): %s", uid, calling_ae_title, OUT_OF_RESOURCES, exc)
        return OUT_OF_RESOURCES
    except Exception as exc:
        log.error("C-STORE %s from %s: index write failed (0x%04X): %s", uid, calling_ae_title, INDEX_FAILED, exc)
        if staged.published:
            _remove_unindexed(ctx, uid, rel)
        return INDEX_FAILED
    finally:
        staged.discard()
    if outcome == "duplicate":
        return _duplicate(cfg.duplicate_policy, uid, calling_ae_title)
    if outcome == "replaced":
        log.info("C-STORE %s from %s: duplicate, replaced the stored copy (listener.duplicate_policy=replace)",
                 uid, calling_ae_title)
    log.debug("C-STORE %s from %s stored (%s, %d bytes)", uid, calling_ae_title, outcome, len(encoded))
    return SUCCESS


def _duplicate(policy: str, uid: str, calling_ae_title: str) -> int:
    """The status for an already indexed SOP Instance UID under ``keep`` or ``reject`` (logged)."""
    if policy == "reject":
        log.warning("C-STORE %s from %s refused (0x%04X): duplicate SOP Instance UID "
                    "(listener.duplicate_policy=reject)", uid, calling_ae_title, DUPLICATE_REJECTED)
        return DUPLICATE_REJECTED
    log.info("C-STORE %s from %s: duplicate, kept the stored copy", uid, calling_ae_title)
    return SUCCESS


def _remove_unindexed(ctx: NodeContext, sop_instance_uid: str, rel: str) -> None:
    """After a failed index write, remove the file unless another writer indexed it meanwhile."""
    if instance_exists(ctx.sessions, sop_instance_uid):
        return
    try:
        (ctx.storage_dir / rel).unlink()
    except FileNotFoundError:
        pass
