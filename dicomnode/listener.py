"""The DIMSE listener: association policy (AE titles, peers, TLS, limits) and C-ECHO / C-STORE.

Handlers are thin: they hand the bytes the peer sent to :func:`dicomnode.ingest.store_instance`.
The received dataset is never decoded and re-encoded; the file holds what was received.
This module never imports torch or the model: ingest never waits on inference.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicomnode import qr
from dicomnode.config import Config
from dicomnode.ingest import NodeContext, store_instance

log = logging.getLogger("dicomnode.listener")

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


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (the file meta encoding)."""
    if vr == b"OB":
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


_IMPLEMENTATION = (
    _element(0x00020012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID))
    + _element(0x00020013, b"SH", (PYNETDICOM_IMPLEMENTATION_VERSION + " " * (len(PYNETDICOM_IMPLEMENTATION_VERSION) % 2))
               .encode("ascii"))
)


def part10_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, dataset: bytes) -> bytes:
    """Preamble, DICM, file meta and ``dataset``: the bytes of ``event.encoded_dataset(include_meta=True)``.

    pynetdicom builds the same seven meta elements through a pydicom Dataset (~170 us per instance);
    here they are packed directly.
    """
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _uid_value(sop_class_uid)),
        _element(0x00020003, b"UI", _uid_value(sop_instance_uid)),
        _element(0x00020010, b"UI", _uid_value(transfer_syntax_uid)),
        _IMPLEMENTATION,
    ))
    return b"".join((b"\x00" * 128, b"DICM", _element(0x00020000, b"UL", struct.pack("<L", len(body))), body, dataset))


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


# The receive path ----------------------------------------------------------------------------------
# pynetdicom reads a PDU in 4 KiB recv() calls and its two threads per association poll each other
# with 1 ms sleeps: the DUL thread (socket -> PDUs) sleeps 1 ms whenever it finds nothing to do, the
# association thread (complete DIMSE messages -> handlers) sleeps 1 ms every loop. Per C-STORE that is
# ~2 ms of waiting (a message completes, then waits for the association thread; the response is
# queued, then waits for the DUL thread) and ~130 system calls for a 512x512 slice; encoding the
# C-STORE response through a pydicom Dataset costs ~400 us more. The pieces below keep pynetdicom's
# logic and change, for the associations this listener accepts only: reads fill one buffer per PDU;
# each 1 ms sleep becomes a wait that ends early when there is work (data on the socket or a
# primitive to send for the DUL thread, a complete DIMSE message for the association thread); and the
# association thread packs and sends a plain C-STORE response itself (same bytes). Nothing else in
# the process is affected; with another pynetdicom layout the patches step aside.

class FastAssociationSocket(AssociationSocket):
    """:class:`AssociationSocket` that reads ``nr_bytes`` into one buffer (recv_into) rather than 4 KiB chunks."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        nr_read = 0
        while nr_read < nr_bytes:
            n = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not n:  # connection closed: return what was read, as pynetdicom does
                del view
                del buf[nr_read:]
                return buf
            nr_read += n
        return buf


class _EarlyWakeTime:
    """Stands in for the ``time`` module inside pynetdicom's dul and association modules.

    ``sleep`` in a thread that has a ``_dicomnode_wait`` attribute (set on the DUL and association
    threads of associations accepted here) calls that instead: the same maximum delay, ended early
    when there is work. Every other use (other threads, other functions) is the real ``time``.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(secs: float) -> None:
        wait = getattr(threading.current_thread(), "_dicomnode_wait", None)
        if wait is None:
            time.sleep(secs)
        else:
            wait(secs)


def _patch_pynetdicom_time() -> bool:
    import pynetdicom.association
    import pynetdicom.dul

    for module in (pynetdicom.dul, pynetdicom.association):
        if not isinstance(module.time, _EarlyWakeTime):
            module.time = _EarlyWakeTime()
    return True


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def store_response_pdu(context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str,
                       status: int) -> bytes:
    """The P-DATA-TF PDU of a C-STORE-RSP: its command set (implicit VR little endian) in one PDV."""
    def us(tag: int, value: int) -> bytes:
        return struct.pack("<HHLH", 0x0000, tag, 2, value)

    def ui(tag: int, uid: str) -> bytes:
        value = _uid_value(uid)
        return struct.pack("<HHL", 0x0000, tag, len(value)) + value

    elements = b"".join((
        ui(0x0002, sop_class_uid), us(0x0100, 0x8001), us(0x0120, message_id), us(0x0800, 0x0101),
        us(0x0900, status), ui(0x1000, sop_instance_uid),
    ))
    command = struct.pack("<HHLL", 0x0000, 0x0000, 4, len(elements)) + elements
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command  # command, last fragment
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


def install_early_wake(assoc: Any) -> None:
    """Let the DUL and association threads of ``assoc`` wake as soon as they have work (see above)."""
    dul = assoc.dul
    provider_queue = getattr(dul, "to_provider_queue", None)
    dimse_queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if provider_queue is None or dimse_queue is None or not hasattr(dimse_queue, "not_empty"):
        return  # not the pynetdicom this was written for: keep its polling
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    weakref.finalize(dul, _close_fds, wake_r, wake_w)
    put = provider_queue.put
    # P-DATA primitives queued for the DUL thread and not yet on the wire: the association thread
    # writes to the socket itself only when there are none, so messages never overtake each other.
    pending = [0]
    pending_lock = threading.Lock()

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        if type(item) is P_DATA:
            with pending_lock:
                pending[0] += 1
        put(item, block, timeout)
        try:
            os.write(wake_w, b"\0")
        except OSError:  # pipe full (the DUL thread is behind and will look anyway) or closed
            pass

    provider_queue.put = put_and_wake
    dul_send = dul._send

    def send_and_count(pdu: Any) -> None:
        try:
            dul_send(pdu)
        finally:
            if type(pdu) is P_DATA_TF:
                with pending_lock:
                    pending[0] = max(0, pending[0] - 1)

    dul._send = send_and_count
    state_machine = dul.state_machine

    # A plain C-STORE response (a status, no error comment or offending element) is packed directly
    # (~30 us) instead of through pynetdicom's DIMSE message and pydicom encoder (~400 us). The bytes
    # are the same; only EVT_DIMSE_SENT / EVT_PDU_SENT (pynetdicom's debug logging) are not emitted.
    dimse = assoc.dimse
    send_msg = dimse.send_msg

    def send_msg_fast(primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.ErrorComment is None and primitive.OffendingElement is None
                and state_machine.current_state == "Sta6" and not pending[0]):
            try:
                pdu = store_response_pdu(context_id, primitive.MessageIDBeingRespondedTo,
                                         str(primitive.AffectedSOPClassUID), str(primitive.AffectedSOPInstanceUID),
                                         int(primitive.Status))
            except (UnicodeEncodeError, struct.error, TypeError, ValueError):
                pdu = None
            limit = dimse.maximum_pdu_size
            if pdu is not None and (not limit or len(pdu) - 6 <= limit):
                dul.socket.send(pdu)
                return
        send_msg(primitive, context_id)

    dimse.send_msg = send_msg_fast

    # A complete C-STORE request is served by the DUL thread that assembled it, when the association
    # thread is idle, as DCMTK's storescp and Orthanc do (one thread receives, stores and answers):
    # no hand-over to the other thread and back, which on a busy machine waits for a free core each
    # time. Anything else (other requests, a busy association thread) goes through the queue as before;
    # the lock keeps the two threads from ever serving at the same time.
    serve = assoc._serve_request
    serve_lock = threading.Lock()

    def serve_locked(msg: Any, context_id: int) -> None:
        with serve_lock:
            serve(msg, context_id)

    assoc._serve_request = serve_locked
    queue_put = dimse_queue.put

    def put_or_serve(item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        if (type(msg) is C_STORE and msg.MessageIDBeingRespondedTo is None and threading.current_thread() is dul
                and not dimse_queue.queue and serve_lock.acquire(blocking=False)):
            try:
                serve(msg, context_id)
            finally:
                serve_lock.release()
            return
        queue_put(item, block, timeout)

    dimse_queue.put = put_or_serve

    def dul_wait(secs: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        try:
            ready, _, _ = select.select([wake_r] if sock is None else [sock, wake_r], [], [], secs)
        except (OSError, ValueError):  # socket closed meanwhile
            time.sleep(secs)
            return
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except OSError:
                pass

    def assoc_wait(secs: float) -> None:
        with dimse_queue.not_empty:
            if not dimse_queue._qsize():
                dimse_queue.not_empty.wait(secs)

    dul._dicomnode_wait = dul_wait
    assoc._dicomnode_wait = assoc_wait


class FastRequestHandler(RequestHandler):
    """pynetdicom's request handler with the faster socket reads and early wake-ups of this section."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is not None:  # no Nagle: a response's command and data PDUs leave at once (else ~40 ms per C-FIND match)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if type(sock) is AssociationSocket:
            sock.__class__ = FastAssociationSocket
        if _PATCHED:
            install_early_wake(assoc)
        return assoc


_PATCHED = _patch_pynetdicom_time()


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
