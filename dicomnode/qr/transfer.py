"""Sending stored instances as a C-STORE SCU: the contexts to propose, then each file byte for byte or transcoded.

Used by C-MOVE and C-GET sub-operations (:mod:`dicomnode.qr.service`) and by anything else that sends
what the node stored (routing). Two steps:

1. :func:`storage_contexts` proposes, per SOP class, one presentation context per stored transfer
   syntax (each with that syntax alone, so the peer can accept each one it supports) plus one context
   with the native fallbacks (Explicit VR Little Endian, Implicit VR Little Endian).
2. :func:`send_stored` sends one file over the established association. When a context with the
   stored transfer syntax was accepted, the stored dataset bytes go out unchanged (read from the file
   after its file meta information: group lengths, private elements, deflated or compressed streams
   exactly as received). Otherwise the file is transcoded to an accepted native syntax: native to
   native (including Explicit VR Big Endian, whose OW/OF/OL/OD/OV values are byte-swapped) and
   compressed to native by decoding with the installed pixel data plugins. Each transcoding is logged.
   A peer that answers the stored bytes with "cannot understand" (0xCxxx) gets them once more, re-encoded
   in the same syntax by pydicom (dictionary VRs for elements stored as UN), with a warning in the log.

pynetdicom sends a file path chunk by chunk from disk without decoding it when
``_config.STORE_SEND_CHUNKED_DATASET`` is set (its documented option); this module sets it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.presentation import PresentationContext, build_context

from dicomnode.dicom_status import SOP_CLASS_NOT_SUPPORTED

log = logging.getLogger("dicomnode.qr.transfer")

# send_c_store(path) sends the stored bytes from disk, undecoded, over a context of the stored syntax.
_pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: C-STORE statuses this module answers itself when an instance cannot be sent at all.
CANNOT_READ = 0xC001          # stored file missing or unreadable (a C-STORE "Cannot understand" failure)
NO_CONTEXT = SOP_CLASS_NOT_SUPPORTED  # no accepted context for the SOP class ("Refused: SOP Class not supported")
CANNOT_TRANSCODE = 0xC002     # no accepted syntax the file could be transcoded to (or decoding failed)
SEND_FAILED = 0xA7FF          # the association broke or the peer sent no (valid) response

_SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def storage_contexts(instances: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Presentation contexts to propose as SCU for ``instances``, (SOP class UID, stored transfer syntax) pairs.

    Per SOP class, in first-seen order: one context per stored transfer syntax (that syntax alone), then
    one context [Explicit VR Little Endian, Implicit VR Little Endian], the fallback the node transcodes to.
    At most 128 contexts (pynetdicom's and PS3.8's limit): when there are more, the per-syntax contexts of
    later SOP classes are dropped first, keeping a fallback context for every SOP class that fits.
    """
    by_class: dict[str, list[str]] = {}
    for sop_class, syntax in instances:
        syntaxes = by_class.setdefault(str(sop_class), [])
        ts = str(syntax or ExplicitVRLittleEndian)
        if ts not in syntaxes:
            syntaxes.append(ts)
    fallback_contexts = [build_context(sop, list(NATIVE)) for sop in list(by_class)[:MAX_CONTEXTS]]
    room = MAX_CONTEXTS - len(fallback_contexts)
    contexts: list[PresentationContext] = []
    for sop, fallback in zip(by_class, fallback_contexts):
        for ts in by_class[sop]:
            if room > 0:
                contexts.append(build_context(sop, [ts]))
                room -= 1
        contexts.append(fallback)
    return contexts


def _accepted(assoc: Any, sop_class_uid: str) -> list[PresentationContext]:
    return [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class_uid and cx.as_scu]


_message_ids: "weakref.WeakKeyDictionary[Any, itertools.count]" = weakref.WeakKeyDictionary()
_message_ids_lock = threading.Lock()


def _next_message_id(assoc: Any) -> int:
    """Message IDs 1..65535, counted per association (sub-operations of one association never repeat one)."""
    with _message_ids_lock:
        counter = _message_ids.setdefault(assoc, itertools.count(1))
        return (next(counter) - 1) % 65535 + 1


def _decode_all(ds: Dataset, swap: bool) -> None:
    """Decode every element in place (a raw element gets its VR and value from the original encoding), and
    with ``swap`` byte-swap the values pydicom does not convert between endiannesses (OW, OF, OL, OD, OV)."""
    for elem in ds:  # iterating converts raw elements with the original encoding
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_all(item, swap)
        elif swap and elem.VR in _SWAP and isinstance(elem.value, (bytes, bytearray)) and elem.value:
            import numpy as np

            width = _SWAP[elem.VR]
            elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def transcoded(path: Path, target: str) -> Dataset:
    """The stored file at ``path`` as a dataset to be encoded in ``target`` (a native transfer syntax).

    Compressed pixel data is decoded (the installed pydicom pixel data plugins: pylibjpeg, openjpeg, RLE);
    a big endian file has its OW/OF/OL/OD/OV values swapped. Raises when the file cannot be decoded.
    """
    ds = dcmread(path)
    stored = UID(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    if stored.is_compressed:
        ds.decompress(generate_instance_uid=False)  # same instance, only its encoding changes
    else:
        _decode_all(ds, swap=not stored.is_little_endian)
    target_uid = UID(target)
    ds.file_meta.TransferSyntaxUID = target_uid
    ds.set_original_encoding(target_uid.is_implicit_VR, True, ds.original_character_set)
    return ds


def _status_of(response: Dataset) -> int:
    status = response.get("Status") if response is not None else None
    return int(status) if status is not None else SEND_FAILED


def send_stored(assoc: Any, path: Path, sop_class_uid: str, sop_instance_uid: str, stored_transfer_syntax: str,
                *, originator_ae: str | None = None, originator_msg_id: int | None = None) -> int:
    """C-STORE one stored file over the established ``assoc``; returns the DIMSE status of the sub-operation.

    Byte for byte (the stored dataset bytes, read from disk after the file meta information) when the peer
    accepted a context of ``stored_transfer_syntax`` for ``sop_class_uid``; otherwise transcoded to an
    accepted native syntax (Explicit VR Little Endian preferred), which is logged. A "cannot understand"
    (0xCxxx) answer to the stored bytes gets one re-encoded retry in the same syntax. When the instance cannot
    be sent the status says why, without sending anything: :data:`CANNOT_READ` (file missing or
    unreadable), :data:`NO_CONTEXT` (no context accepted for the SOP class), :data:`CANNOT_TRANSCODE`
    (nothing accepted that the file can be transcoded to, or decoding failed), :data:`SEND_FAILED`
    (association lost, no response).
    """
    path = Path(path)
    peer = str(assoc.acceptor.ae_title if assoc.is_requestor else assoc.requestor.ae_title).strip()
    if not path.is_file():
        log.error("C-STORE of %s to %s not sent: stored file %s is missing", sop_instance_uid, peer, path)
        return CANNOT_READ
    contexts = _accepted(assoc, sop_class_uid)
    if not contexts:
        log.error("C-STORE of %s to %s not sent: the peer accepted no presentation context for SOP class %s",
                  sop_instance_uid, peer, sop_class_uid)
        return NO_CONTEXT
    stored = str(stored_transfer_syntax or ExplicitVRLittleEndian)
    kwargs: dict[str, Any] = {"msg_id": _next_message_id(assoc)}
    if originator_ae is not None:
        kwargs["originator_aet"] = originator_ae
    if originator_msg_id is not None:
        kwargs["originator_id"] = originator_msg_id
    syntaxes = [str(cx.transfer_syntax[0]) for cx in contexts]
    try:
        if stored in syntaxes:
            status = _status_of(assoc.send_c_store(path, **kwargs))
            if not 0xC000 <= status <= 0xCFFF:
                return status
            # "Cannot understand": some parsers refuse what others accept (e.g. every element declared UN,
            # as one fixture's modality wrote it). Once more, re-encoded by pydicom with dictionary VRs.
            log.warning("C-STORE of %s to %s: the peer could not parse the stored bytes (0x%04X); sending it once "
                        "more re-encoded in %s with dictionary VRs", sop_instance_uid, peer, status, UID(stored).name)
            ds = dcmread(path)
            _decode_all(ds, swap=False)
            kwargs["msg_id"] = _next_message_id(assoc)
            return _status_of(assoc.send_c_store(ds, **kwargs))
        target = next((ts for ts in NATIVE if ts in syntaxes), None)
        if target is None:
            log.error("C-STORE of %s to %s not sent: stored as %s, the peer accepted only %s for %s and the node "
                      "transcodes only to Explicit or Implicit VR Little Endian", sop_instance_uid, peer,
                      UID(stored).name, ", ".join(UID(ts).name for ts in syntaxes), sop_class_uid)
            return CANNOT_TRANSCODE
        try:
            ds = transcoded(path, target)
        except Exception as exc:
            log.error("C-STORE of %s to %s not sent: transcoding %s -> %s failed (%s: %s)", sop_instance_uid, peer,
                      UID(stored).name, UID(target).name, type(exc).__name__, exc)
            return CANNOT_TRANSCODE
        log.info("C-STORE of %s to %s transcoded %s -> %s (the peer accepted no context for the stored syntax)",
                 sop_instance_uid, peer, UID(stored).name, UID(target).name)
        return _status_of(assoc.send_c_store(ds, **kwargs))
    except Exception as exc:  # encoding failed, association lost while sending
        log.error("C-STORE of %s to %s failed (%s: %s)", sop_instance_uid, peer, type(exc).__name__, exc)
        return SEND_FAILED
