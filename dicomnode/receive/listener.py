"""The DIMSE listener: association policy (AE titles, peers, TLS, limits) and C-ECHO / C-STORE.

Handlers are thin: they hand the bytes the peer sent to :func:`dicomnode.receive.ingest.store_instance`.
The received dataset is never decoded and re-encoded; the file holds what was received.
This module never imports torch or the model: ingest never waits on inference.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import qr
from dicomnode.config import Config
from dicomnode.http import metrics
from dicomnode.receive.association_limit import AssociationSlots
from dicomnode.receive.fastpath import FastRequestHandler, engage, part10_bytes
from dicomnode.receive.ingest import NodeContext, store_instance

log = logging.getLogger("dicomnode.receive.listener")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

#: Transfer syntaxes accepted for storage, in order of preference.
STORAGE_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51",   # JPEG Extended
    "1.2.840.10008.1.2.4.53",   # JPEG Spectral Selection (retired: stored as sent, not decoded)
    "1.2.840.10008.1.2.4.55",   # JPEG Full Progression (retired: stored as sent, not decoded)
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.5",      # RLE Lossless
]


def storage_sop_classes(cfg: Config) -> list[str]:
    """The storage SOP classes accepted: ``listener.sop_classes`` (UIDs or pydicom keywords; empty =
    every storage SOP class pynetdicom knows, so a PACS can route a whole study), plus
    ``listener.extra_sop_classes``. All are stored and indexed; only CT is classified."""
    from pynetdicom import AllStoragePresentationContexts

    listed = cfg.listener.sop_classes
    classes = [] if listed else [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    for key, items in (("sop_classes", listed), ("extra_sop_classes", cfg.listener.extra_sop_classes)):
        for i, item in enumerate(items):
            uid = UID(item) if item[:1].isdigit() else _uid_from_keyword(item, f"{key}[{i}]")
            if not uid.is_valid:
                raise ValueError(f"config key 'listener.{key}[{i}]': {item!r} is not a valid UID")
            if uid not in classes:
                classes.append(str(uid))
    return classes


def _uid_from_keyword(keyword: str, key: str) -> UID:
    from pydicom.uid import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4] == keyword:
            return UID(uid)
    raise ValueError(f"config key 'listener.{key}': unknown SOP class keyword {keyword!r}")


def supported_contexts(cfg: Config) -> list[PresentationContext]:
    contexts = [build_context(Verification)]
    storage = [build_context(uid, STORAGE_TRANSFER_SYNTAXES) for uid in storage_sop_classes(cfg)]
    for cx in storage:  # C-GET: accept a requestor's SCP/SCU role proposal (we send C-STOREs back to it)
        cx.scu_role, cx.scp_role = True, True
    contexts += storage
    contexts += qr.supported_contexts(cfg)
    return contexts


# Handlers ------------------------------------------------------------------------------------------

def handle_echo(event: evt.Event) -> int:
    log.info("C-ECHO from %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address)
    return 0x0000


def _encoded(event: evt.Event) -> bytes:
    request = event.request
    try:
        return part10_bytes(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                            str(event.context.transfer_syntax), request.DataSet.getvalue())
    except (UnicodeEncodeError, AttributeError, struct.error):  # odd request: let pynetdicom encode it
        return event.encoded_dataset(include_meta=True)


def handle_store(event: evt.Event, ctx: NodeContext) -> int:
    request = event.request
    return metrics.cstore(store_instance(
        ctx,
        _encoded(event),
        calling_ae_title=event.assoc.requestor.ae_title,
        expected_sop_class_uid=str(request.AffectedSOPClassUID),
        expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
    ), event)


def peer_allowed(cfg: Config, ae_title: str, host: str) -> bool:
    """True when no allow-list is configured, or (ae_title, host) matches an entry of it."""
    peers = cfg.security.allowed_peers
    if not peers:
        return True
    return any(p.ae_title.strip() == ae_title.strip() and (not p.host or p.host == host) for p in peers)


def handle_requested(event: evt.Event, cfg: Config, slots: AssociationSlots) -> None:
    """A-ASSOCIATE-RQ received: reject a calling AE (or host) outside the allow-list, or any beyond
    the node-wide association limit (counted in ``slots``, released when the association ends)."""
    requestor = event.assoc.requestor
    ae_title = requestor.primitive.calling_ae_title
    if not peer_allowed(cfg, ae_title, requestor.address):
        log.warning("association from %s at %s rejected: calling AE title not in security.allowed_peers",
                    ae_title, requestor.address)
        metrics.association_rejected(event.assoc, "calling_ae_title_not_allowed")  # before the peer hears of it
        # rejected-permanent, service-user, calling-AE-title-not-recognized
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        # As pynetdicom does for its own rejections: let the DUL send the A-ASSOCIATE-RJ before the
        # socket is closed, otherwise the peer may see an abort instead of the rejection.
        event.assoc.kill()
        return
    if not slots.acquire():
        log.warning("association from %s at %s rejected: %d association(s) active on the node "
                    "(listener.max_associations)", ae_title, requestor.address, slots.limit)
        metrics.association_rejected(event.assoc, "local_limit_exceeded")  # before the peer hears of it
        # rejected-transient, service-provider (presentation), local-limit-exceeded
        event.assoc.acse.send_reject(0x02, 0x03, 0x02)
        event.assoc.kill()
        return
    event.assoc._dicomnode_slot = slots


def handle_rejected(event: evt.Event) -> None:
    metrics.association_rejected(event.assoc)  # pynetdicom's own rejection (called AE title, its limit)
    log.warning("association from %s at %s rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)


def handle_established(event: evt.Event) -> None:
    metrics.association_accepted()
    rejected = sorted({cx.abstract_syntax for cx in event.assoc.rejected_contexts})
    names = [f"{uid.name} ({uid})" if uid.name != uid else str(uid) for uid in rejected]
    refused = f": {', '.join(names)}" if names else ""
    log.info("association from %s at %s accepted (%d presentation context(s) accepted, %d SOP class(es) rejected%s)",
             event.assoc.requestor.ae_title, event.assoc.requestor.address, len(event.assoc.accepted_contexts),
             len(rejected), refused)


def event_handlers(ctx: NodeContext, slots: AssociationSlots) -> list[Any]:
    return [
        (evt.EVT_REQUESTED, handle_requested, [ctx.config, slots]),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_ESTABLISHED, handle_established),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        *qr.event_handlers(ctx),
    ]


# The server -----------------------------------------------------------------------------------------

def _server_on(listening: socket.socket) -> type[ThreadedAssociationServer]:
    """A server class that serves on an already bound and listening socket (shared by processes)."""

    class InheritedSocketServer(ThreadedAssociationServer):
        def server_bind(self) -> None:
            self.socket.close()
            self.socket = listening
            self.server_address = listening.getsockname()

        def server_activate(self) -> None:  # already listening
            pass

    return InheritedSocketServer


def listening_socket(cfg: Config) -> socket.socket:
    """Bind and listen on the configured address; the listener processes all accept from this socket."""
    return socket.create_server((cfg.bind_address, cfg.port), backlog=128)


def make_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    tls = cfg.security.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_certificate or None)
    context.load_cert_chain(certfile=tls.certificate, keyfile=tls.private_key)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


#: Connections per listener process that may be open without an association, beyond max_associations.
_UNASSOCIATED_CONNECTIONS = 256


def make_ae(cfg: Config) -> AE:
    ae = AE(ae_title=cfg.ae_title)
    ae.require_called_aet = cfg.security.check_called_ae_title
    # The node-wide limit is enforced in handle_requested (AssociationSlots), on associations. pynetdicom's
    # own count is per process and includes connections that have not (yet) sent an A-ASSOCIATE-RQ:
    # kept only as a backstop well above it, so that idle or garbage connections (each closed after
    # acse_timeout_s / network_timeout_s, with bounded memory) do not lock out real peers.
    ae.maximum_associations = cfg.listener.max_associations + _UNASSOCIATED_CONNECTIONS
    ae.acse_timeout = cfg.listener.acse_timeout_s
    ae.dimse_timeout = cfg.listener.dimse_timeout_s
    ae.network_timeout = cfg.listener.network_timeout_s
    ae.maximum_pdu_size = cfg.listener.max_pdu_bytes  # advertised in the A-ASSOCIATE-AC, and enforced
    return ae


class _SlotReleasingHandler(FastRequestHandler):
    """Releases the association's node-wide slot (taken in handle_requested) when its thread ends."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        run = assoc.run

        def run_then_release() -> None:
            try:
                run()
            finally:
                slots = assoc.__dict__.pop("_dicomnode_slot", None)
                if slots is not None:
                    slots.release()

        assoc.run = run_then_release  # threading.Thread.start() calls self.run()
        return assoc


def start_listener(ctx: NodeContext, listening: socket.socket | None = None, slots: AssociationSlots | None = None):
    """Start the SCP in background threads and return the running server (``server.shutdown()`` stops it).

    With ``listening`` (a bound, listening socket, see :func:`listening_socket`) several processes serve
    one port: each accepts from the shared socket, as pre-forking servers do; ``slots`` then counts
    their associations against the node-wide ``listener.max_associations`` (default: this process only).
    """
    cfg = ctx.config
    engage()  # logs once per process whether the pynetdicom fast path is engaged
    ae = make_ae(cfg)
    slots = slots or AssociationSlots(cfg.listener.max_associations)
    server = ae.make_server(
        (cfg.bind_address, cfg.port),
        contexts=supported_contexts(cfg),
        ssl_context=make_ssl_context(cfg),
        evt_handlers=event_handlers(ctx, slots),
        server_class=_server_on(listening) if listening is not None else ThreadedAssociationServer,
        request_handler=_SlotReleasingHandler,
    )
    ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it again
    thread = threading.Thread(target=server.serve_forever, name="dicomnode-listener", daemon=True)
    thread.start()
    return server
