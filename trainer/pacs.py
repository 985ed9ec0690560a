"""Talking to a PACS for the miner: associations, C-FIND, C-MOVE / C-GET and the storage SCP that receives.

:class:`Pacs` opens associations as needed and turns every refusal, abort and timeout into a
:class:`MiningError` that says what to do (register our AE title, check host and port, ...).
:class:`Retriever` brings instances into the dataset folder: C-MOVE to the node when it answers at the
move destination (files copied from its storage), else to the miner's own pynetdicom storage SCP
(files written by :func:`dicomnode.receive.storage.write_atomic`), or C-GET. A retrieval that reports success
but delivers nothing is a failure. Logs name UIDs and AE titles only.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pydicom.dataset import Dataset

from dicomnode.receive import storage
from dicomnode.config import AE_TITLE_RE, Config, RemoteAE
from dicomnode.dicom_status import (
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES,
    SUCCESS,
    WARNING_SUB_OPERATIONS,
)
from dicomnode.dicom_status import NOT_AUTHORIZED as STORE_NOT_REQUESTED  # an instance this run did not ask for
from dicomnode.dicom_status import PENDING_CODES as PENDING
from dicomnode.receive.listener import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, STORAGE_TRANSFER_SYNTAXES

log = logging.getLogger("trainer.pacs")

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"

IMAGES_DIR = "images"
KOS_DIR = "kos"

# C-FIND / C-MOVE / C-GET statuses


class MiningError(RuntimeError):
    """The PACS refused, timed out or failed in a way the run cannot go on from; the message says what to do."""


# Addresses --------------------------------------------------------------------------------------

def parse_remote(text: str, what: str = "--pacs") -> RemoteAE:
    """``AE@host:port`` to a :class:`RemoteAE`; ``ValueError`` naming ``what`` when malformed."""
    m = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>[^:@]+|\[[^\]]+\]):(?P<port>\d+)", text.strip())
    if not m:
        raise ValueError(f"{what}: {text!r} is not AE@host:port (e.g. ORTHANC@127.0.0.1:4242)")
    ae, port = m["ae"].strip(), int(m["port"])
    if not AE_TITLE_RE.match(ae):
        raise ValueError(f"{what}: {ae!r} is not a valid AE title (1-16 characters, no backslash)")
    if not 0 < port < 65536:
        raise ValueError(f"{what}: {port} is not a TCP port")
    return RemoteAE(ae_title=ae, host=m["host"].strip("[]"), port=port)


def describe_remote(remote: RemoteAE) -> str:
    return f"{remote.ae_title}@{remote.host}:{remote.port}"


def our_ae(cfg: Config) -> RemoteAE:
    """The miner's own AE (calling AE title and storage SCP): ``mining.move_destination``, else the node's AE."""
    dest = cfg.mining.move_destination
    if dest.ae_title:
        return dest
    return RemoteAE(ae_title=cfg.ae_title, host="127.0.0.1", port=cfg.port)


# DIMSE client ---------------------------------------------------------------------------------------

def _status(ds: Dataset | None) -> int | None:
    return int(ds.Status) if ds is not None and "Status" in ds else None


class Pacs:
    """Associations with one PACS, opened as needed: C-FIND (one association reused), C-MOVE, C-GET.

    Every failure to connect, rejection, abort or timeout raises :class:`MiningError` with what to do.
    """

    def __init__(self, remote: RemoteAE, calling: RemoteAE, timeout_s: float) -> None:
        if not remote.ae_title:
            raise MiningError("no PACS configured: set mining.pacs (ae_title, host, port) in the config "
                              "or pass --pacs AE@host:port")
        self.remote = remote
        self.calling = calling
        self.timeout_s = timeout_s
        self._find_assoc = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return describe_remote(self.remote)

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        return ae

    def associate(self, contexts: list[Any], ext_neg: list[Any] | None = None, evt_handlers: list[Any] | None = None,
                  what: str = "query"):
        """An established association for ``what``; :class:`MiningError` saying why not."""
        try:
            with socket.create_connection((self.remote.host, self.remote.port), timeout=self.timeout_s):
                pass
        except ConnectionRefusedError:
            raise MiningError(f"cannot connect to the PACS {self.name}: connection refused "
                              "(is it running, are host and port right?)") from None
        except (socket.timeout, TimeoutError):
            raise MiningError(f"cannot connect to the PACS {self.name}: no answer within "
                              f"{self.timeout_s:g} s (mining.timeout_s)") from None
        except OSError as exc:
            raise MiningError(f"cannot connect to the PACS {self.name}: {exc.strerror or exc}") from None
        ae = self._ae()
        for cx in contexts:
            ae.add_requested_context(*cx) if isinstance(cx, tuple) else ae.add_requested_context(cx)
        started = time.monotonic()
        assoc = ae.associate(self.remote.host, self.remote.port, ae_title=self.remote.ae_title,
                             ext_neg=ext_neg, evt_handlers=evt_handlers)
        if assoc.is_established:
            return assoc
        advice = (f"check the PACS's AE title ({self.remote.ae_title!r}) and register our AE title "
                  f"{self.calling.ae_title!r} (host {self.calling.host}, port {self.calling.port}) on the PACS")
        if assoc.is_rejected:
            raise MiningError(f"the PACS {self.name} rejected the association from our AE title "
                              f"{self.calling.ae_title!r} for {what}: {advice}")
        # Only to word the message: a PACS that rejects and closes at once can look like an abort.
        if time.monotonic() - started < self.timeout_s * 0.9:
            raise MiningError(f"the PACS {self.name} rejected or aborted the association from our AE title "
                              f"{self.calling.ae_title!r} for {what}: {advice}")
        raise MiningError(f"the PACS {self.name} did not accept an association for {what} within "
                          f"{self.timeout_s:g} s (mining.timeout_s): it timed out")

    def _aborted(self, what: str) -> MiningError:
        return MiningError(
            f"the PACS {self.name} ended the association during {what} without an answer (aborted, or "
            f"nothing within {self.timeout_s:g} s, mining.timeout_s): a PACS does this when our AE title "
            f"{self.calling.ae_title!r} is not allowed to {what.split()[0]}; register it on the PACS")

    def find(self, identifier: Dataset) -> tuple[list[Dataset], bool]:
        """Study Root C-FIND; (answers, truncated) where truncated means the PACS stopped early
        (Cancel 0xFE00 or Out of Resources 0xA700, as when it caps its number of answers)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        what = f"C-FIND at {identifier.QueryRetrieveLevel} level"
        with self._lock:
            if self._find_assoc is None or not self._find_assoc.is_established:
                self._find_assoc = self.associate([FIND], what="C-FIND")
            answers: list[Dataset] = []
            try:
                for status, ident in self._find_assoc.send_c_find(identifier, FIND):
                    code = _status(status)
                    if code is None:
                        self._find_assoc = None
                        raise self._aborted(what)
                    if code in PENDING:
                        if ident is not None:
                            answers.append(ident)
                        continue
                    if code == SUCCESS:
                        return answers, False
                    if code == CANCEL or code == OUT_OF_RESOURCES:
                        return answers, True
                    comment = status.get("ErrorComment", "")
                    raise MiningError(f"the PACS {self.name} refused {what}: status 0x{code:04X}"
                                      + (f" ({comment})" if comment else ""))
            except RuntimeError as exc:  # pynetdicom: association no longer established
                if isinstance(exc, MiningError):
                    raise
                self._find_assoc = None
                raise self._aborted(what) from exc
            self._find_assoc = None
            raise self._aborted(what)

    def close(self) -> None:
        with self._lock:
            if self._find_assoc is not None and self._find_assoc.is_established:
                self._find_assoc.release()
            self._find_assoc = None

    def move(self, identifier: Dataset, destination: str) -> tuple[int, int, int]:
        """C-MOVE to ``destination``; (final status, completed, failed) sub-operations."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        assoc = self.associate([MOVE], what="C-MOVE")
        try:
            return self._retrieve_responses(assoc.send_c_move(identifier, destination, MOVE), "C-MOVE")
        finally:
            if assoc.is_established:
                assoc.release()

    def get(self, identifier: Dataset, handler: Callable[[Any], int], sop_classes: list[str]) -> tuple[int, int, int]:
        """C-GET over one association that also takes the C-STOREs (SCP role for ``sop_classes``)."""
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        # One context per (SOP class, transfer syntax): the PACS sends each file in its own syntax.
        contexts: list[Any] = [GET] + [(uid, [ts]) for uid in sop_classes for ts in STORAGE_TRANSFER_SYNTAXES]
        roles = [build_role(uid, scp_role=True) for uid in sop_classes]
        assoc = self.associate(contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handler)], what="C-GET")
        try:
            return self._retrieve_responses(assoc.send_c_get(identifier, GET), "C-GET")
        finally:
            if assoc.is_established:
                assoc.release()

    def _retrieve_responses(self, responses, what: str) -> tuple[int, int, int]:
        final: tuple[int, int, int] | None = None
        for status, _ in responses:
            code = _status(status)
            if code is None:
                raise self._aborted(what)
            completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            if code not in PENDING:
                final = (code, completed, failed)
        if final is None:
            raise self._aborted(what)
        return final


# Retrieval ------------------------------------------------------------------------------------------

def _store_status(encoded: bytes, out_dir: Path, expected: set[str], received: set[str], lock: threading.Lock,
                  fsync: bool, request_sop_class_uid: str | None = None, request_sop_instance_uid: str | None = None,
                  calling_ae_title: str = "") -> int:
    """Write one received instance under ``out_dir`` (images/ or kos/); the C-STORE status to answer.

    The bytes are checked as the node checks them (:func:`dicomnode.receive.ingest.check_received`: the
    dataset decodes, its UIDs are valid and match the request's)."""
    from dicomnode.receive.ingest import check_received

    header = check_received(encoded, calling_ae_title, request_sop_class_uid, request_sop_instance_uid)
    if isinstance(header, int):
        return header
    uid = header.sop_instance_uid
    with lock:
        wanted = uid in expected
    if not wanted:
        log.warning("received instance %s refused (0x%04X): not requested by this mining run", uid,
                    STORE_NOT_REQUESTED)
        return STORE_NOT_REQUESTED
    folder = KOS_DIR if header.sop_class_uid == KOS_STORAGE else IMAGES_DIR
    rel = folder + "/" + storage.relative_path(header.study_instance_uid, header.series_instance_uid, uid)
    try:
        storage.write_atomic(out_dir, rel, encoded, fsync=fsync)
    except OSError as exc:
        log.error("received instance %s refused (0x%04X): %s", uid, OUT_OF_RESOURCES, exc)
        return OUT_OF_RESOURCES
    with lock:
        received.add(uid)
    return SUCCESS


def dataset_path(out_dir: Path, study_uid: str, series_uid: str, sop_uid: str, kos: bool = False) -> Path:
    return out_dir / (KOS_DIR if kos else IMAGES_DIR) / storage.relative_path(study_uid, series_uid, sop_uid)


class Retriever:
    """Brings instances into the dataset folder by C-MOVE (to the node or our own SCP) or C-GET.

    ``start()`` decides: C-GET when ``mining.use_c_get``; else C-ECHO the move destination: when the
    node answers there, its storage folder (``storage_dir``) receives the files and they are copied;
    when nothing answers, the miner serves a storage SCP there itself.
    """

    def __init__(self, cfg: Config, pacs: Pacs, out_dir: Path) -> None:
        self.cfg = cfg
        self.pacs = pacs
        self.out_dir = out_dir
        self.dest = our_ae(cfg)
        self.mode = "c-get" if cfg.mining.use_c_get else "c-move"
        self._server = None
        self._lock = threading.Lock()
        self.expected: set[str] = set()
        self.received: set[str] = set()

    def _node_answers(self) -> bool:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        try:
            with socket.create_connection((self.dest.host, self.dest.port), timeout=2.0):
                pass
        except OSError:
            return False
        ae = AE(ae_title=self.dest.ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(self.cfg.mining.timeout_s, 10.0)
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
        if not assoc.is_established:
            raise MiningError(f"the move destination {describe_remote(self.dest)} is in use by a program that "
                              "refuses our association: stop it or choose another --move-dest")
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        return _status(status) == SUCCESS

    def start(self) -> None:
        if self.mode == "c-get":
            return
        if self._node_answers():
            self.mode = "node"
            log.info("the node answers at %s: C-MOVE delivers to its storage %s", describe_remote(self.dest),
                     self.cfg.resolved_storage_dir)
            return
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.dest.ae_title)
        ae.require_called_aet = True
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.mining.timeout_s
        ae.maximum_pdu_size = 0
        for uid in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, KOS_STORAGE):
            ae.add_supported_context(uid, STORAGE_TRANSFER_SYNTAXES)
        try:
            self._server = ae.start_server((self.cfg.bind_address, self.dest.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._handle_store)])
        except OSError as exc:
            raise MiningError(f"cannot serve our storage SCP on port {self.dest.port}: {exc.strerror or exc}") from None
        log.info("storage SCP %s listening for C-MOVE sub-operations", describe_remote(self.dest))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _handle_store(self, event) -> int:
        request = event.request
        return _store_status(event.encoded_dataset(include_meta=True), self.out_dir, self.expected, self.received,
                             self._lock, self.cfg.listener.fsync, str(request.AffectedSOPClassUID or ""),
                             str(request.AffectedSOPInstanceUID or ""), event.assoc.requestor.ae_title)

    def retrieve(self, study_uid: str, series_uid: str, sop_uids: list[str], kos: bool = False) -> list[str]:
        """Retrieve instances of one series at IMAGE level; return the SOP UIDs now in the dataset folder.

        Raises :class:`MiningError` for 0xA801, other failures with nothing delivered, aborts and
        timeouts, and for a success that delivered nothing.
        """
        if not sop_uids:
            return []
        with self._lock:
            self.expected.update(sop_uids)
            self.received.difference_update(sop_uids)
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        q.SOPInstanceUID = sop_uids if len(sop_uids) > 1 else sop_uids[0]
        what = f"series {series_uid} ({len(sop_uids)} instance(s))"
        if self.mode == "c-get":
            code, completed, failed = self.pacs.get(q, self._handle_store,
                                                    [KOS_STORAGE] if kos else [CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE])
        else:
            code, completed, failed = self.pacs.move(q, self.dest.ae_title)
        verb = "C-GET" if self.mode == "c-get" else "C-MOVE"
        if code == MOVE_DESTINATION_UNKNOWN:
            raise MiningError(
                f"the PACS {self.pacs.name} answered 0xA801 (move destination unknown) to C-MOVE of {what}: register "
                f"our AE title {self.dest.ae_title!r} (host {self.dest.host}, port {self.dest.port}) on the PACS as a "
                "DICOM modality, or pass --move-dest with the AE the PACS knows")
        if self.mode == "node":
            got = self._copy_from_node(study_uid, series_uid, sop_uids, kos)
        else:
            with self._lock:
                got = [u for u in sop_uids if u in self.received]
        if not got:
            if code in (SUCCESS, WARNING_SUB_OPERATIONS) or code in PENDING:
                where = (f"the node's storage {self.cfg.resolved_storage_dir}" if self.mode == "node"
                         else f"our storage SCP {describe_remote(self.dest)}" if self.mode == "c-move"
                         else "this association")
                raise MiningError(
                    f"{verb} of {what} from {self.pacs.name} reported status 0x{code:04X} ({completed} completed) but "
                    f"no file arrived at {where}: check the host and port the PACS has for our AE title "
                    f"{self.dest.ae_title!r}")
            hint = (f": nothing arrived; the PACS may not know our AE title {self.dest.ae_title!r} (register it: host "
                    f"{self.dest.host}, port {self.dest.port}) or cannot reach it at the address it has for it"
                    if verb == "C-MOVE" else ": nothing arrived")
            raise MiningError(f"{verb} of {what} from {self.pacs.name} failed with status 0x{code:04X} "
                              f"({completed} completed, {failed} failed){hint}")
        return got

    def _copy_from_node(self, study_uid: str, series_uid: str, sop_uids: list[str], kos: bool) -> list[str]:
        got = []
        for uid in sop_uids:
            src = self.cfg.resolved_storage_dir / storage.relative_path(study_uid, series_uid, uid)
            if src.is_file():
                rel = (KOS_DIR if kos else IMAGES_DIR) + "/" + storage.relative_path(study_uid, series_uid, uid)
                storage.write_atomic(self.out_dir, rel, src.read_bytes(), fsync=self.cfg.listener.fsync)
                got.append(uid)
        return got
