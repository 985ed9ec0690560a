"""Faster replacements for pieces of pynetdicom's C-STORE receive path, for the listener's associations.

- :func:`part10_bytes` packs the file meta of a received instance directly (the same bytes as
  ``event.encoded_dataset(include_meta=True)``, without building a pydicom Dataset).
- :class:`FastRequestHandler` makes the associations the listener accepts read whole PDUs and wake
  their threads as soon as there is work, and answers a plain C-STORE with a directly packed response.

These rely on pynetdicom 3.0's internals (``dul.to_provider_queue``, ``dimse.msg_queue``, the ``time``
module of its ``dul`` and ``association`` modules; pyproject pins pynetdicom to 3.0.x). :func:`engage`
checks them when a listener starts and logs once whether the fast path is engaged; where they are not
as expected it is not, and pynetdicom's own code runs. This is the module to check first after a
pynetdicom upgrade (tests/test_fastpath.py checks it engages on the pinned version).

The PDU bounds (``listener.max_pdu_bytes``, the network timeout on a PDU body) are enforced by
:class:`FastAssociationSocket`; the socket timeout applies even where the fast path is not engaged.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicomnode.dicom_status import CANNOT_DECODE, INVALID_UID

log = logging.getLogger("dicomnode.receive.fastpath")


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

#: Largest A-ASSOCIATE-RQ (and any PDU other than P-DATA-TF) accepted, in bytes: 128 presentation
#: contexts with 10 transfer syntaxes each and a user identity item stay far below it.
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
_ABORT_PDU = struct.pack(">BBLBBBB", 0x07, 0x00, 4, 0x00, 0x00, 0x02, 0x06)  # provider, invalid PDU parameter
#: A PDU's buffer starts at most this large (DCMTK sends 128 KiB PDUs: one allocation, as before) and
#: grows x4 as data arrives: an announced length alone never costs more than this.
_FIRST_CHUNK = 256 * 1024


class PduTooLong(OSError):
    """A peer's PDU header claims more bytes than this node accepts."""


class FastAssociationSocket(AssociationSocket):
    """:class:`AssociationSocket` with bounded, timed PDU reads.

    - A PDU header whose length exceeds the limit (``max_pdu_bytes`` for a P-DATA-TF, the node's
      advertised maximum; :data:`MAX_ASSOCIATE_RQ_BYTES` for any other PDU) is answered with an
      A-ABORT and the connection closed, with a log line: nothing is allocated for it.
    - The buffer of a PDU grows with what has arrived (256 KiB, then x4 up to the announced length),
      so a header that lies costs at most what the peer really sent (or 256 KiB).
    - A PDU body must arrive within ``network_timeout`` seconds (each read waits at most that long,
      and the whole body too): a stalled peer is disconnected.
    - Reads go into one buffer (recv_into) rather than pynetdicom's 4 KiB chunks.
    """

    max_pdu_bytes: int = 0  # 0: no limit (set by FastRequestHandler from the AE)
    pdu_timeout: float | None = None
    _body_length: int | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body_length is not None and nr_bytes == self._body_length:
            self._body_length = None
            return self._read(nr_bytes)
        header = self._read(nr_bytes)
        if nr_bytes == 6 and len(header) == 6:  # pynetdicom reads a PDU's type and length first
            pdu_type, _, length = struct.unpack(">BBL", header)
            limit = self.max_pdu_bytes if pdu_type == 0x04 else MAX_ASSOCIATE_RQ_BYTES
            if limit and length > limit:
                self._refuse(pdu_type, length, limit)
                return bytearray()  # too short a header: pynetdicom closes the connection (Evt17)
            self._body_length = length
        return header

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        log.warning("connection from %s aborted: PDU type 0x%02X announces %d bytes, more than the %d accepted%s",
                    _peer(self), pdu_type, length, limit,
                    " (listener.max_pdu_bytes)" if pdu_type == 0x04 else " for this PDU type")
        try:
            self.socket.sendall(_ABORT_PDU)
        except (OSError, AttributeError):
            pass

    def _read(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        buf = bytearray(min(nr_bytes, _FIRST_CHUNK))
        view = memoryview(buf)
        nr_read = 0
        deadline = None if self.pdu_timeout is None else time.monotonic() + self.pdu_timeout
        try:
            while nr_read < nr_bytes:
                if nr_read == len(buf):  # grow with what has arrived, never to a length only announced
                    view.release()
                    buf += bytes(min(nr_bytes, 4 * len(buf)) - len(buf))
                    view = memoryview(buf)
                n = sock.recv_into(view[nr_read:], len(buf) - nr_read)
                if not n:  # connection closed: return what was read, as pynetdicom does
                    break
                nr_read += n
                if deadline is not None and nr_read < nr_bytes and time.monotonic() > deadline:
                    raise TimeoutError
        except TimeoutError:
            # A short result makes pynetdicom close the connection (Evt17), as for a peer that hung up.
            log.warning("connection from %s closed: only %d of %d bytes of a PDU arrived within "
                        "listener.network_timeout_s (%s s)", _peer(self), nr_read, nr_bytes, self.pdu_timeout)
        view.release()
        if nr_read < len(buf):
            del buf[nr_read:]
        return buf


def _peer(sock: AssociationSocket) -> str:
    try:
        return str(sock.assoc.requestor.address)
    except AttributeError:
        return "?"


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


def _patch_pynetdicom_time() -> None:
    import pynetdicom.association
    import pynetdicom.dul

    for module in (pynetdicom.dul, pynetdicom.association):
        if not isinstance(module.time, _EarlyWakeTime):
            module.time = _EarlyWakeTime()


# What the pieces below use of pynetdicom, checked before any is installed (see fast_path_status).
_CLASS_ATTRIBUTES = {
    "pynetdicom.dul": ["time", "DULServiceProvider._send", "DULServiceProvider._read_pdu_data"],
    "pynetdicom.association": ["time", "Association._serve_request", "Association.run", "Association.abort"],
    "pynetdicom.dimse": ["DIMSEServiceProvider.send_msg"],
    "pynetdicom.transport": ["AssociationSocket.recv", "AssociationSocket.send", "RequestHandler._create_association"],
}
_INSTANCE_ATTRIBUTES = ["_accepted_cx", "requestor", "dul.to_provider_queue", "dul.state_machine", "dul.socket",
                        "dul._send", "dimse.msg_queue", "dimse.msg_queue.not_empty", "dimse.send_msg", "dimse.msg_queue.queue", "dimse.msg_queue._qsize",
                        "dimse.maximum_pdu_size"]


def _missing(obj: Any, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return True
        obj = getattr(obj, name)
    return False


def fast_path_status() -> tuple[bool, str]:
    """(engaged, why): whether this pynetdicom has everything the fast path replaces or wraps.

    Checked when a listener starts (not at import), so that a pynetdicom upgrade that renamed an
    internal makes the listener run pynetdicom's own code, with a log line, instead of failing.
    """
    import importlib

    import pynetdicom

    for module_name, names in _CLASS_ATTRIBUTES.items():
        module = importlib.import_module(module_name)
        for name in names:
            if _missing(module, name):
                return False, f"pynetdicom {pynetdicom.__version__} has no {module_name}.{name}"
    return True, f"pynetdicom {pynetdicom.__version__}"


_ENGAGED: list[bool] = []  # [engaged] once engage() has run in this process


def engage() -> bool:
    """Check :func:`fast_path_status`, log the result once per process, install the time patch if engaged."""
    if not _ENGAGED:
        engaged, why = fast_path_status()
        if engaged:
            _patch_pynetdicom_time()
            log.info("listener fast path engaged (%s)", why)
        else:
            log.warning("listener fast path NOT engaged, pynetdicom's own receive code runs: %s", why)
        _ENGAGED.append(engaged)
    return _ENGAGED[0]


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
    """Let the DUL and association threads of ``assoc`` wake as soon as they have work (see above).

    The caller has checked ``_INSTANCE_ATTRIBUTES`` on ``assoc`` (FastRequestHandler)."""
    dul = assoc.dul
    provider_queue = dul.to_provider_queue
    dimse_queue = assoc.dimse.msg_queue
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


_UID_FIELDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")


def install_request_guard(assoc: Any) -> None:
    """Answer, or abort with a log line, the requests pynetdicom would silently drop.

    pynetdicom 3.0 ignores a request that lacks a required command element (e.g. an empty Affected
    SOP Instance UID: "Received unexpected C-STORE service message", at its WARNING level) and aborts
    on a request for an unknown presentation context with only an INFO line: the peer then waits for
    a response that never comes. Here a C-STORE request with a Message ID gets a failure response
    (0xC220 for a missing UID, 0xC210 otherwise); one without a Message ID, or on a context that was
    not accepted, aborts the association with a warning naming the reason.
    """
    serve = assoc._serve_request
    dimse = assoc.dimse

    def serve_or_answer(msg: Any, context_id: int) -> None:
        if type(msg) is C_STORE and msg.MessageIDBeingRespondedTo is None:
            peer = assoc.requestor.ae_title
            if context_id not in assoc._accepted_cx:
                log.warning("association from %s aborted: C-STORE request on presentation context %s, "
                            "which was not accepted", peer, context_id)
                assoc.abort()
                return
            if not msg.is_valid_request:
                if msg.MessageID is None:
                    log.warning("association from %s aborted: C-STORE request without a Message ID", peer)
                    assoc.abort()
                    return
                missing = [name for name in _UID_FIELDS if not getattr(msg, name, None)]
                status = INVALID_UID if missing else CANNOT_DECODE
                log.warning("C-STORE from %s refused (0x%04X): the request lacks %s", peer, status,
                            ", ".join(missing) if missing else "a required command element or its data set")
                rsp = C_STORE()
                rsp.MessageIDBeingRespondedTo = msg.MessageID
                for name in _UID_FIELDS:
                    value = getattr(msg, name, None)
                    if value:
                        setattr(rsp, name, value)
                rsp.Status = status
                dimse.send_msg(rsp, context_id)
                return
        serve(msg, context_id)

    assoc._serve_request = serve_or_answer


class FastRequestHandler(RequestHandler):
    """pynetdicom's request handler with the bounded socket reads and early wake-ups of this section.

    Without :func:`engage` (or where it found pynetdicom changed) it is pynetdicom's own handler.
    """

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is not None:
            # Accepted sockets block forever by default: a peer that stops mid-PDU would hold the
            # association (and its buffer) for ever. Reads and writes wait at most network_timeout.
            raw.settimeout(self.ae.network_timeout)
            # no Nagle: a response's command and data PDUs leave at once (else ~40 ms per C-FIND match)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not (_ENGAGED and _ENGAGED[0]):
            return assoc  # pynetdicom's own reads and polling (still with the timeout above)
        if type(sock) is AssociationSocket:
            sock.__class__ = FastAssociationSocket
            sock.max_pdu_bytes = self.ae.maximum_pdu_size or 0
            sock.pdu_timeout = self.ae.network_timeout
        missing = [name for name in _INSTANCE_ATTRIBUTES if _missing(assoc, name)]
        if missing:  # not the pynetdicom this was written for: its own code runs
            log.debug("fast path not installed on this association: it has no %s", ", ".join(missing))
            return assoc
        install_request_guard(assoc)
        install_early_wake(assoc)
        return assoc
