"""The C-MOVE and C-GET SCP of the node's listener: requests in, sub-operations out, PS3.4 responses back.

pynetdicom's own Q/R SCP opens the move destination's association itself and re-encodes every dataset
it is given, so it can neither send the stored bytes unchanged, nor tell an unreachable destination from
an unknown one (0xA801 for both), nor hand the destination association to the handler. The node runs
its own: :func:`serve_move` / :func:`serve_get` replace pynetdicom's ``_move_scp`` / ``_get_scp`` for
the associations the listener accepted (marked by :func:`attach`, an EVT_ESTABLISHED handler); every
other association in the process keeps pynetdicom's. The pieces of pynetdicom used here (the service
class's ``dimse``, ``is_cancelled`` and the method names) are checked after a pynetdicom upgrade by
tests/test_qr_retrieve.py.

Statuses (PS3.4 C.4.2.1.5 / C.4.3.1.5): 0xFF00 pending after each sub-operation; final 0x0000, 0xB000
(some failed or warned, with the Failed SOP Instance UID List), 0xA702 (none could be performed: all
failed, or the destination could not be reached), 0xFE00 (cancelled), 0xA801 (destination unknown),
0xA900 (identifier does not fit the model), 0xC000 (identifier cannot be processed), 0x0124 (calling
AE not allowed to retrieve, see :func:`dicomnode.qr.access.qr_allowed`).
"""

from __future__ import annotations

import logging
import socket
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.service_class import QueryRetrieveServiceClass

from dicomnode.dicom_status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    MOVE_DESTINATION_UNKNOWN,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES_SUB_OPERATIONS,
    PENDING,
    UNABLE_TO_PROCESS,
    WARNING_SUB_OPERATIONS,
)
from dicomnode.qr.access import qr_allowed
from dicomnode.qr.matching import QueryError
from dicomnode.qr.query import IdentifierError, describe
from dicomnode.qr.retrieve import Counts, find_destination, select_matches, suboperations
from dicomnode.qr.transfer import storage_contexts

log = logging.getLogger("dicomnode.qr.service")

UNABLE_TO_PERFORM = OUT_OF_RESOURCES_SUB_OPERATIONS
DESTINATION_UNKNOWN = MOVE_DESTINATION_UNKNOWN

_ATTR = "_dicomnode_qr_context"
_pynetdicom_move = QueryRetrieveServiceClass._move_scp
_pynetdicom_get = QueryRetrieveServiceClass._get_scp


def attach(event: evt.Event, ctx: Any) -> None:
    """EVT_ESTABLISHED handler: C-MOVE / C-GET requests on this association are served by this module."""
    setattr(event.assoc, _ATTR, ctx)


def _move_scp(service: QueryRetrieveServiceClass, req: C_MOVE, context: Any) -> None:
    ctx = getattr(service.assoc, _ATTR, None)
    if ctx is None:
        return _pynetdicom_move(service, req, context)
    _serve(service, req, context, ctx, "C-MOVE")


def _get_scp(service: QueryRetrieveServiceClass, req: C_GET, context: Any) -> None:
    ctx = getattr(service.assoc, _ATTR, None)
    if ctx is None:
        return _pynetdicom_get(service, req, context)
    _serve(service, req, context, ctx, "C-GET")


QueryRetrieveServiceClass._move_scp = _move_scp  # type: ignore[method-assign]
QueryRetrieveServiceClass._get_scp = _get_scp  # type: ignore[method-assign]


class _Responder:
    """Builds and sends the C-MOVE / C-GET responses of one request."""

    def __init__(self, service: QueryRetrieveServiceClass, req: Any, context: Any, what: str):
        self.service, self.req, self.what = service, req, what
        self.cx_id = context.context_id
        self.ts = context.transfer_syntax[0]

    def send(self, status: int, counts: Counts | None = None, final: bool = True) -> None:
        rsp = C_MOVE() if self.what == "C-MOVE" else C_GET()
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = status
        if counts is not None:
            if not final or status == CANCEL:
                rsp.NumberOfRemainingSuboperations = counts.remaining
            rsp.NumberOfCompletedSuboperations = counts.completed
            rsp.NumberOfFailedSuboperations = counts.failed
            rsp.NumberOfWarningSuboperations = counts.warning
            if final and counts.failed_uids:
                ds = Dataset()
                ds.FailedSOPInstanceUIDList = counts.failed_uids
                rsp.Identifier = BytesIO(encode(ds, self.ts.is_implicit_VR, self.ts.is_little_endian,
                                                self.ts.is_deflated))
        self.service.dimse.send_msg(rsp, self.cx_id)

    def final(self, counts: Counts) -> int:
        if counts.failed == 0 and counts.warning == 0:
            status = 0x0000
        elif counts.failed == counts.total:
            status = UNABLE_TO_PERFORM
        else:
            status = WARNING_SUB_OPERATIONS
        self.send(status, counts)
        return status


def _identifier(req: Any, ts: Any) -> Dataset:
    identifier = decode(req.Identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    for _ in identifier:  # decode every element now (charset, VR) so a bad one fails here
        pass
    return identifier


def _connect_error(host: str, port: int, timeout: float) -> str:
    """Why a TCP connection to host:port fails (the association attempt does not say)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "TCP connection possible, but the association was not established (rejected or aborted)"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _serve(service: QueryRetrieveServiceClass, req: Any, context: Any, ctx: Any, what: str) -> None:
    """Serve one C-MOVE or C-GET request; any error is answered with a status and logged, never raised."""
    responder = _Responder(service, req, context, what)
    assoc = service.assoc
    calling, address = str(assoc.requestor.ae_title).strip(), assoc.requestor.address
    peer = f"{calling}@{address}"
    try:
        _serve_checked(service, req, ctx, what, responder, calling, address, peer)
    except Exception as exc:  # the node never crashes on a request
        log.exception("%s from %s failed (%s: %s); answering 0x%04X", what, peer, type(exc).__name__, exc,
                      UNABLE_TO_PROCESS)
        try:
            responder.send(UNABLE_TO_PROCESS)
        except Exception:
            pass


def _serve_checked(service: Any, req: Any, ctx: Any, what: str, responder: _Responder, calling: str,
                   address: str, peer: str) -> None:
    from dicomnode.qr import ROOTS

    cfg = ctx.config
    if not qr_allowed(cfg, calling, address):
        log.warning("%s from %s refused (0x%04X): calling AE %s at %s is not in qr.allowed_peers nor a move "
                    "destination", what, peer, NOT_AUTHORIZED, calling, address)
        responder.send(NOT_AUTHORIZED)
        return
    try:
        identifier = _identifier(req, responder.ts)
    except Exception as exc:
        log.warning("%s from %s: identifier does not decode (%s: %s)", what, peer, type(exc).__name__, exc)
        responder.send(UNABLE_TO_PROCESS)
        return
    destination = None
    if what == "C-MOVE":
        destination = find_destination(cfg, str(req.MoveDestination or ""))
        if destination is None:
            wanted = str(req.MoveDestination or "").strip()
            log.error("C-MOVE from %s refused (0x%04X): move destination %r is unknown; register it in the config "
                      "under qr.move_destinations (- ae_title: %s, host: <address>, port: <port>) and restart the "
                      "node", peer, DESTINATION_UNKNOWN, wanted, wanted or "<AE title>")
            responder.send(DESTINATION_UNKNOWN)
            return
    try:
        level, matches = select_matches(ctx.sessions, identifier, ROOTS[str(req.AffectedSOPClassUID)])
    except IdentifierError as exc:
        log.warning("%s from %s refused (0x%04X): %s", what, peer, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, exc)
        responder.send(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        return
    except QueryError as exc:
        log.warning("%s from %s refused (0x%04X): %s", what, peer, UNABLE_TO_PROCESS, exc)
        responder.send(UNABLE_TO_PROCESS)
        return
    summary = f"{what} {describe(identifier, level)} from {peer}"
    if destination is not None:
        summary += f" to {destination.ae_title}"
    counts = Counts(total=len(matches))
    log.info("%s: %d instance(s)", summary, len(matches))
    if not matches:
        responder.final(counts)
        return
    storage_dir = ctx.storage_dir
    is_cancelled = lambda: service.is_cancelled(req.MessageID)  # noqa: E731
    if destination is None:  # C-GET: the sub-operations go back over the requesting association
        store_assoc, originator = service.assoc, {}
    else:
        store_assoc = service.assoc.ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title,
            contexts=storage_contexts((m.sop_class_uid, m.transfer_syntax_uid) for m in matches))
        if not store_assoc.is_established:
            error = _connect_error(destination.host, destination.port, min(cfg.listener.network_timeout_s, 10.0))
            log.error("%s: destination %s at %s:%d cannot be reached (%s); %d sub-operation(s) failed (0x%04X)",
                      summary, destination.ae_title, destination.host, destination.port, error, len(matches),
                      UNABLE_TO_PERFORM)
            counts.fail_remaining(matches)
            responder.final(counts)
            return
        originator = {"originator_ae": cfg.ae_title, "originator_msg_id": req.MessageID}
    try:
        for _match, _status in suboperations(store_assoc, matches, storage_dir, counts,
                                             is_cancelled=is_cancelled, **originator):
            if not service.assoc.is_established:
                log.warning("%s: the requesting association ended after %d of %d sub-operation(s)", summary,
                            counts.total - counts.remaining, counts.total)
                return
            if counts.remaining:
                responder.send(PENDING, counts, final=False)
    finally:
        if store_assoc is not service.assoc and store_assoc.is_established:
            store_assoc.release()
    if counts.remaining:
        log.info("%s cancelled after %d of %d sub-operation(s)", summary, counts.total - counts.remaining,
                 counts.total)
        responder.send(CANCEL, counts)
        return
    status = responder.final(counts)
    log.info("%s: final 0x%04X (%d completed, %d warning, %d failed)", summary, status, counts.completed,
             counts.warning, counts.failed)
