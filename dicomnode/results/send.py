"""C-STORE to a configured destination: result documents built in memory, or stored instances as stored.

One association per call. Stored instances go through :func:`dicomnode.qr.transfer.send_stored` (the
stored bytes when the destination accepts their transfer syntax, transcoded otherwise). Any status but
success or a warning raises :class:`SendError`, naming the destination and the first failing UIDs, so
the job is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicomnode.config import Config, RemoteAE
from dicomnode.qr.transfer import send_stored, storage_contexts
from dicomnode.results.content import SliceRef

log = logging.getLogger("dicomnode.results.send")


class SendError(RuntimeError):
    """The destination could not be reached or did not store everything."""


def is_stored(status: int) -> bool:
    """C-STORE success or warning (PS3.4 B.2.3: 0x0000, 0x0001, 0xB000-0xBFFF)."""
    return status in (0x0000, 0x0001) or 0xB000 <= status <= 0xBFFF


def _associate(cfg: Config, dest: RemoteAE, contexts: list):
    ae = AE(ae_title=cfg.ae_title)
    ae.acse_timeout = cfg.listener.acse_timeout_s
    ae.dimse_timeout = cfg.listener.dimse_timeout_s
    ae.network_timeout = cfg.listener.network_timeout_s
    assoc = ae.associate(dest.host, dest.port, contexts=contexts, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise SendError(f"no association with {dest.ae_title}@{dest.host}:{dest.port} "
                        f"({'rejected' if assoc.is_rejected else 'aborted or unreachable'})")
    return assoc


def _check(dest: RemoteAE, failed: list[tuple[str, int]], total: int) -> None:
    if failed:
        first = ", ".join(f"{uid} (0x{status:04X})" for uid, status in failed[:3])
        raise SendError(f"{dest.ae_title}@{dest.host}:{dest.port} did not store {len(failed)} of {total} "
                        f"instance(s): {first}")


def send_datasets(cfg: Config, dest: RemoteAE, datasets: Sequence[Dataset]) -> None:
    """C-STORE ``datasets`` (built in memory) to ``dest``; :class:`SendError` unless all were stored."""
    classes = list(dict.fromkeys(str(ds.SOPClassUID) for ds in datasets))
    assoc = _associate(cfg, dest, [build_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
                                   for c in classes])
    failed: list[tuple[str, int]] = []
    try:
        for ds in datasets:
            response = assoc.send_c_store(ds)
            status = int(response.Status) if response is not None and "Status" in response else 0xA7FF
            if not is_stored(status):
                failed.append((str(ds.SOPInstanceUID), status))
    finally:
        assoc.release()
    _check(dest, failed, len(datasets))


def send_slices(cfg: Config, dest: RemoteAE, slices: Sequence[SliceRef],
                keep_alive: Callable[[], bool] | None = None) -> None:
    """C-STORE stored instances to ``dest``; :class:`SendError` unless all were stored.

    ``keep_alive`` is called after each instance (the job's lease); when it answers False the job was
    taken over by another runner and sending stops with :class:`SendError`.
    """
    storage = cfg.resolved_storage_dir
    assoc = _associate(cfg, dest, storage_contexts((s.sop_class_uid, s.transfer_syntax_uid) for s in slices))
    failed: list[tuple[str, int]] = []
    try:
        for s in slices:
            status = send_stored(assoc, Path(storage) / s.path, s.sop_class_uid, s.sop_instance_uid,
                                 s.transfer_syntax_uid)
            if not is_stored(status):
                failed.append((s.sop_instance_uid, status))
            if not assoc.is_established:
                failed.extend((r.sop_instance_uid, 0xA7FF) for r in slices[slices.index(s) + 1:])
                break
            if keep_alive is not None and not keep_alive():
                raise SendError(f"lease lost while sending to {dest.ae_title}; another runner has the job")
    finally:
        if assoc.is_established:
            assoc.release()
    _check(dest, failed, len(slices))
