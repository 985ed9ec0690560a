"""Query/Retrieve SCP: C-FIND matching over the index and the C-MOVE / C-GET handlers.

The listener asks this package for its presentation contexts (:func:`supported_contexts`) and event
handlers (:func:`event_handlers`). The handlers are thin: they pick the information model from the
request's SOP class and delegate to the plain generator of :mod:`dicomnode.qr.find`, which tests call
without a network; C-MOVE and C-GET are served by :mod:`dicomnode.qr.service` (sub-operations sent by
:mod:`dicomnode.qr.transfer`). Who may use Q/R: :mod:`dicomnode.qr.access`. Keys, private block and example
command lines: docs/query.md.
"""

from __future__ import annotations

import logging
from typing import Any

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

from dicomnode.dicom_status import NOT_AUTHORIZED, UNABLE_TO_PROCESS
from dicomnode.qr.access import qr_allowed

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

    requestor = event.assoc.requestor
    if not qr_allowed(ctx.config, str(requestor.ae_title), requestor.address):
        log.warning("C-FIND from %s refused (0x%04X): calling AE %s at %s is not in qr.allowed_peers nor a move "
                    "destination", _peer(event), NOT_AUTHORIZED, str(requestor.ae_title).strip(), requestor.address)
        yield NOT_AUTHORIZED, None
        return
    identifier = _identifier(event, "C-FIND")
    if identifier is None:
        yield UNABLE_TO_PROCESS, None
        return
    cancelled: list[bool] = []

    def is_cancelled() -> bool:  # pynetdicom reports a C-CANCEL once; remember it
        if not cancelled and event.is_cancelled:
            cancelled.append(True)
        return bool(cancelled)

    yield from find(ctx.sessions, identifier, root=ROOTS[str(event.request.AffectedSOPClassUID)],
                    ae_title=ctx.config.ae_title, is_cancelled=is_cancelled,
                    max_results=ctx.config.qr.max_find_results, peer=_peer(event))


def event_handlers(ctx) -> list[Any]:
    """(event, handler, args) tuples for C-FIND; C-MOVE / C-GET are served by :mod:`dicomnode.qr.service`
    on the associations its EVT_ESTABLISHED handler marks."""
    from dicomnode.qr import service

    return [
        (evt.EVT_ESTABLISHED, service.attach, [ctx]),
        (evt.EVT_C_FIND, handle_find, [ctx]),
    ]
