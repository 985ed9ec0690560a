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
from dicomnode.receive.fastpath import FastRequestHandler, part10_bytes
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
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.5",      # RLE Lossless
]


def storage_sop_classes(cfg: Config) -> list[str]:
    """CT and Enhanced CT, plus ``listener.extra_sop_classes`` (UIDs or pydicom keywords)."""
    classes = [CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE]
    for i, item in enumerate(cfg.listener.extra_sop_classes):
        uid = UID(item) if item[:1].isdigit() else _uid_from_keyword(item, i)
        if not uid.is_valid:
            raise ValueError(f"config key 'listener.extra_sop_classes[{i}]': {item!r} is not a valid UID")
        if uid not in classes:
            classes.append(str(uid))
    return classes


def _uid_from_keyword(keyword: str, i: int) -> UID:
    from pydicom.uid import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4] == keyword:
            return UID(uid)
    raise ValueError(f"config key 'listener.extra_sop_classes[{i}]': unknown SOP class keyword {keyword!r}")


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
    return store_instance(
        ctx,
        _encoded(event),
        calling_ae_title=event.assoc.requestor.ae_title,
        expected_sop_class_uid=str(request.AffectedSOPClassUID),
        expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
    )


def peer_allowed(cfg: Config, ae_title: str, host: str) -> bool:
    """True when no allow-list is configured, or (ae_title, host) matches an entry of it."""
    peers = cfg.security.allowed_peers
    if not peers:
        return True
    return any(p.ae_title.strip() == ae_title.strip() and (not p.host or p.host == host) for p in peers)


def handle_requested(event: evt.Event, cfg: Config) -> None:
    """A-ASSOCIATE-RQ received: reject a calling AE (or host) outside the allow-list."""
    requestor = event.assoc.requestor
    ae_title = requestor.primitive.calling_ae_title
    if not peer_allowed(cfg, ae_title, requestor.address):
        log.warning("association from %s at %s rejected: calling AE title not in security.allowed_peers",
                    ae_title, requestor.address)
        # rejected-permanent, service-user, calling-AE-title-not-recognized
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        # As pynetdicom does for its own rejections: let the DUL send the A-ASSOCIATE-RJ before the
        # socket is closed, otherwise the peer may see an abort instead of the rejection.
        event.assoc.kill()


def handle_rejected(event: evt.Event) -> None:
    log.warning("association from %s at %s rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)


def handle_established(event: evt.Event) -> None:
    rejected = sorted({str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts})
    log.info("association from %s at %s accepted (%d presentation context(s) accepted, %d SOP class(es) rejected)",
             event.assoc.requestor.ae_title, event.assoc.requestor.address, len(event.assoc.accepted_contexts),
             len(rejected))
    if rejected:
        log.debug("SOP classes rejected for %s: %s", event.assoc.requestor.ae_title, ", ".join(rejected))


def event_handlers(ctx: NodeContext) -> list[Any]:
    return [
        (evt.EVT_REQUESTED, handle_requested, [ctx.config]),
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


def make_ae(cfg: Config, max_associations: int | None = None) -> AE:
    ae = AE(ae_title=cfg.ae_title)
    ae.require_called_aet = cfg.security.check_called_ae_title
    ae.maximum_associations = max_associations or cfg.listener.max_associations
    ae.acse_timeout = cfg.listener.acse_timeout_s
    ae.dimse_timeout = cfg.listener.dimse_timeout_s
    ae.network_timeout = cfg.listener.network_timeout_s
    ae.maximum_pdu_size = 0  # no limit on what we receive
    return ae


def start_listener(ctx: NodeContext, listening: socket.socket | None = None, max_associations: int | None = None):
    """Start the SCP in background threads and return the running server (``server.shutdown()`` stops it).

    With ``listening`` (a bound, listening socket, see :func:`listening_socket`) several processes serve
    one port: each accepts from the shared socket, as pre-forking servers do.
    """
    cfg = ctx.config
    ae = make_ae(cfg, max_associations)
    server = ae.make_server(
        (cfg.bind_address, cfg.port),
        contexts=supported_contexts(cfg),
        ssl_context=make_ssl_context(cfg),
        evt_handlers=event_handlers(ctx),
        server_class=_server_on(listening) if listening is not None else ThreadedAssociationServer,
        request_handler=FastRequestHandler,
    )
    ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it again
    thread = threading.Thread(target=server.serve_forever, name="dicomnode-listener", daemon=True)
    thread.start()
    return server
