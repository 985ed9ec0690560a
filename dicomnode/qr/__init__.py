"""Query/Retrieve SCP: C-FIND matching over the index and the C-MOVE / C-GET handlers.

The listener asks this package for its presentation contexts (:func:`supported_contexts`) and event
handlers (:func:`event_handlers`). The handlers are thin: they pick the information model from the
request's SOP class and delegate to the plain generators of :mod:`dicomnode.qr.find` and
:mod:`dicomnode.qr.retrieve`, which tests call without a network. Keys, private block and example
command lines: docs/query.md.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import _config as _pynetdicom_config
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

log = logging.getLogger("dicomnode.qr")

# pynetdicom logs every Q/R request identifier in full (patient names, IDs) at INFO: never in this node.
_pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False

ROOTS: dict[str, str] = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}

UNABLE_TO_PROCESS = 0xC000

QR_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                        ExplicitVRBigEndian]


def supported_contexts(cfg) -> list[PresentationContext]:
    """Presentation contexts of the Q/R SOP classes the listener should accept (Patient and Study Root)."""
    # Explicit VR first: the private block's VRs reach the peer (in implicit VR they arrive as UN).
    return [build_context(uid, QR_TRANSFER_SYNTAXES) for uid in ROOTS]


def _peer(event: evt.Event) -> str:
    return f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"


def _identifier(event: evt.Event, what: str):
    try:
        identifier = event.identifier
        for _ in identifier:  # decode every element now (charset, VR) so a bad one fails here
            pass
        return identifier
    except Exception as exc:
        log.warning("%s from %s: identifier does not decode (%s: %s)", what, _peer(event), type(exc).__name__, exc)
        return None


def handle_find(event: evt.Event, ctx) -> Any:
    """EVT_C_FIND: yields (status, identifier) pairs from :func:`dicomnode.qr.find.find`."""
    from dicomnode.qr.find import find

    identifier = _identifier(event, "C-FIND")
    if identifier is None:
        yield UNABLE_TO_PROCESS, None
        return
    yield from find(ctx.sessions, identifier, root=ROOTS[str(event.request.AffectedSOPClassUID)],
                    ae_title=ctx.config.ae_title, is_cancelled=lambda: event.is_cancelled,
                    max_results=ctx.config.qr.max_find_results, peer=_peer(event))


def _store_association_contexts(event: evt.Event, destination: str) -> Callable[[], list | None]:
    """The contexts accepted by the move destination on the sub-association pynetdicom opened for this move.

    pynetdicom does not hand that association to the handler: it is the newest established association
    this AE requested from ``destination``; found once, on the first sub-operation.
    """
    found: list = []

    def accepted() -> list | None:
        if not found:
            for assoc in reversed(event.assoc.ae.active_associations):
                if (assoc is not event.assoc and assoc.is_requestor and assoc.is_established
                        and str(assoc.acceptor.ae_title).strip() == destination.strip()):
                    found.append(assoc.accepted_contexts)
                    break
        return found[0] if found else None

    return accepted


def handle_move(event: evt.Event, ctx) -> Any:
    """EVT_C_MOVE: destination, number of sub-operations, then (status, dataset) from :func:`retrieve.move`."""
    from dicomnode.qr.retrieve import move

    identifier = _identifier(event, "C-MOVE")
    if identifier is None:
        raise ValueError("C-MOVE identifier does not decode")
    destination = str(event.move_destination or "")
    yield from move(ctx.config, ctx.sessions, identifier, destination,
                    root=ROOTS[str(event.request.AffectedSOPClassUID)], storage_dir=ctx.storage_dir,
                    is_cancelled=lambda: event.is_cancelled,
                    accepted=_store_association_contexts(event, destination), peer=_peer(event))


def handle_get(event: evt.Event, ctx) -> Any:
    """EVT_C_GET: number of sub-operations, then (status, dataset) from :func:`retrieve.get`."""
    from dicomnode.qr.retrieve import get

    identifier = _identifier(event, "C-GET")
    if identifier is None:
        raise ValueError("C-GET identifier does not decode")
    yield from get(ctx.config, ctx.sessions, identifier, root=ROOTS[str(event.request.AffectedSOPClassUID)],
                   storage_dir=ctx.storage_dir, is_cancelled=lambda: event.is_cancelled,
                   accepted=lambda: event.assoc.accepted_contexts, peer=_peer(event))


def event_handlers(ctx) -> list[Any]:
    """(event, handler, args) tuples for C-FIND / C-MOVE / C-GET."""
    return [
        (evt.EVT_C_FIND, handle_find, [ctx]),
        (evt.EVT_C_MOVE, handle_move, [ctx]),
        (evt.EVT_C_GET, handle_get, [ctx]),
    ]
