"""Faster replacements for pieces of pynetdicom's C-STORE receive path, for the listener's associations.

- :func:`part10_bytes` packs the file meta of a received instance directly (the same bytes as
  ``event.encoded_dataset(include_meta=True)``, without building a pydicom Dataset).
- :class:`FastRequestHandler` makes the associations the listener accepts read whole PDUs and wake
  their threads as soon as there is work, and answers a plain C-STORE with a directly packed response.

These rely on pynetdicom 3's internals (``dul.to_provider_queue``, ``dimse.msg_queue``, the ``time``
module of its ``dul`` and ``association`` modules); where they are not as expected, each piece steps
aside and pynetdicom's own code runs. This is the module to check first after a pynetdicom upgrade.
"""

from __future__ import annotations

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
