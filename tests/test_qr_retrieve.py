"""C-MOVE / C-GET SCP with DCMTK's movescu / getscu and pynetdicom as peers on loopback.

The move destination is a real pynetdicom Storage SCP registered in the node's config; what it receives
is compared byte for byte with the files the node stored.
"""

from __future__ import annotations

import logging
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

import qr_data
from conftest import dcmtk, free_port
from dicomnode.config import RemoteAE
from dicomnode.db.models import Instance
from dicomnode.qr import retrieve


@pytest.fixture
def node(running_node):
    return running_node, qr_data.populate(running_node)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def same_content(received: bytes, path: Path, explicit: bool = True) -> bool:
    """The dataset that arrived holds the stored file's elements with equal values and the pixel data
    byte for byte (the compressed stream was neither decoded nor re-encoded).

    Element headers may differ: a file that declares VR UN for elements the dictionary knows (the
    Philips fixture does) is written with the known VRs when pydicom encodes it.
    """
    from io import BytesIO

    from pydicom.filereader import read_dataset

    sent = read_dataset(BytesIO(received), is_implicit_VR=not explicit, is_little_endian=True)
    stored = pydicom.dcmread(path)
    sent.SpecificCharacterSet = stored.get("SpecificCharacterSet", "ISO_IR 6")
    if set(sent.keys()) != set(stored.keys()):
        return False
    if sent.get_item(0x7FE00010).value != stored.get_item(0x7FE00010).value:
        return False
    return all((sent[t].value or None) == (stored[t].value or None) for t in stored.keys() if t != 0x7FE00010)


@contextmanager
def storage_scp(ae_title: str = "VIEWER", status_of=lambda uid: 0x0000, transfer_syntaxes=AllTransferSyntaxes):
    """A pynetdicom Storage SCP on a free port; yields (port, received: {SOP UID: (transfer syntax, bytes)})."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        received[uid] = (str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return status_of(uid)

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(CTImageStorage, transfer_syntaxes)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, received
    finally:
        server.shutdown()


def register(ctx, ae_title: str, port: int) -> None:
    ctx.config.qr.move_destinations.append(RemoteAE(ae_title=ae_title, host="127.0.0.1", port=port))


def c_move(port: int, identifier: Dataset, destination: str, model=StudyRootQueryRetrieveInformationModelMove):
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        responses = [(status, ds) for status, ds in assoc.send_c_move(identifier, destination, model)]
    finally:
        assoc.release()
    return responses[-1]


def ident(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_movescu_moves_the_liver_slices_and_only_those(node):
    ctx, st = node
    with storage_scp() as (scp_port, received):
        register(ctx, "VIEWER", scp_port)
        proc = subprocess.run([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aem", "VIEWER", "-aec", "DICOMNODE",
                               "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SeriesInstanceUID={st.philips_series}",
                               "-k", "BodyPartExamined=LIVER", "127.0.0.1", str(ctx.config.port)],
                              capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert set(received) == st.liver_sops()
    for uid, (ts, data) in received.items():
        assert ts == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless, as stored: not decoded, not re-encoded
        assert same_content(data, st.files[uid]), f"{uid} differs from the stored file"


def test_move_counts_warnings_and_failures(node):
    ctx, st = node
    sops = st.philips_sops
    warn = {sops[62], sops[63]}
    with ctx.sessions() as s:  # one stored file has gone missing from disk
        path = s.query(Instance.path).filter(Instance.sop_instance_uid == sops[64]).scalar()
    (ctx.storage_dir / path).unlink()
    with storage_scp(status_of=lambda uid: 0xB000 if uid in warn else 0x0000) as (scp_port, received):
        register(ctx, "VIEWER", scp_port)
        status, failed = c_move(ctx.config.port, ident("IMAGE", SeriesInstanceUID=st.philips_series,
                                                       BodyPartExamined="LIVER"), "VIEWER")
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfWarningSuboperations,
            status.NumberOfFailedSuboperations) == (3, 2, 1)
    assert list(failed.FailedSOPInstanceUIDList) == [sops[64]] or failed.FailedSOPInstanceUIDList == sops[64]
    assert set(received) == st.liver_sops() - {sops[64]}


def test_move_to_an_unknown_destination_is_refused_with_a801(node, caplog):
    ctx, st = node
    caplog.set_level(logging.INFO)
    proc = subprocess.run([dcmtk("movescu"), "-S", "-v", "-aet", "MOVESCU", "-aem", "NOWHERE", "-aec", "DICOMNODE",
                           "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={st.philips_series}",
                           "127.0.0.1", str(ctx.config.port)], capture_output=True, timeout=60)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    assert "Refused: MoveDestinationUnknown" in text, text  # DCMTK's name of 0xA801
    status, _ = c_move(ctx.config.port, ident("SERIES", SeriesInstanceUID=st.philips_series), "NOWHERE")
    assert status.Status == 0xA801
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("dicomnode"))
    assert "'NOWHERE' is unknown" in logged and "qr.move_destinations" in logged


def test_move_study_level_patient_root_and_bad_identifier(node):
    ctx, st = node
    with storage_scp(transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as (scp_port, received):
        register(ctx, "VIEWER", scp_port)
        status, _ = c_move(ctx.config.port, ident("STUDY", PatientID="Lung_Dx-A0001",
                                                  StudyInstanceUID=st.philips_study), "VIEWER",
                           PatientRootQueryRetrieveInformationModelMove)
        assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 10
        # The destination accepts no JPEG 2000: the files were decompressed so that they could be delivered.
        assert set(received) == set(st.philips_sops.values())
        assert {ts for ts, _ in received.values()} <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        # A retrieve without any key value would move the whole archive: refused (0xCxxx), nothing sent.
        received.clear()
        status, _ = c_move(ctx.config.port, ident("STUDY", StudyInstanceUID=""), "VIEWER")
        assert 0xC000 <= status.Status <= 0xCFFF and not received


def _getscu(ctx, out: Path, keys: list[str], *extra) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", "DICOMNODE", "-od", str(out), *extra]
    for k in keys:
        args += ["-k", k]
    return subprocess.run(args + ["127.0.0.1", str(ctx.config.port)], capture_output=True, timeout=120)


def test_getscu_series_level(node, tmp_path):
    """getscu proposes JPEG 2000 and uncompressed in one context; the listener accepts explicit VR little
    endian there, so the node decompresses: every slice arrives, pixel for pixel equal to the stored one."""
    ctx, st = node
    proc = _getscu(ctx, tmp_path / "all", ["QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={st.philips_series}"],
                   "+xv")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    got = {pydicom.dcmread(f).SOPInstanceUID: f for f in (tmp_path / "all").iterdir()}
    assert set(got) == set(st.philips_sops.values())
    for uid in (st.philips_sops[55], st.philips_sops[64]):
        received = pydicom.dcmread(got[uid])
        assert not received.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(received.pixel_array, pydicom.dcmread(st.files[uid]).pixel_array)  # lossless


def test_getscu_region_filter(node, tmp_path):
    ctx, st = node
    proc = _getscu(ctx, tmp_path / "liver", ["QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={st.philips_series}",
                                             "BodyPartExamined=LIVER"])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    got = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (tmp_path / "liver").iterdir()}
    assert got == st.liver_sops()


def test_c_get_with_pynetdicom_counts(node):
    ctx, st = node
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.90"])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    got: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        got[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax),
                                                          event.encoded_dataset(include_meta=False))
        return 0x0000

    assoc = ae.associate("127.0.0.1", ctx.config.port, ae_title="DICOMNODE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(ident("STUDY", StudyInstanceUID=f"{st.philips_study}\\{st.ge_study}"),
                                          StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 13
    assert set(got) == set(st.files)
    for uid in st.philips_sops.values():  # the compressed-only context was accepted: sent as stored
        ts, data = got[uid]
        assert ts == "1.2.840.10008.1.2.4.90" and same_content(data, st.files[uid])


def test_store_contexts_offer_stored_syntax_and_an_uncompressed_fallback():
    matches = [retrieve.Match("1.2.3", CTImageStorage, "1.2.840.10008.1.2.4.90", "a"),
               retrieve.Match("1.2.4", CTImageStorage, ImplicitVRLittleEndian, "b")]
    proposed = [(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in retrieve.store_contexts(matches)]
    assert proposed == [
        (CTImageStorage, ("1.2.840.10008.1.2.4.90",)),
        (CTImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        (CTImageStorage, (ImplicitVRLittleEndian, ExplicitVRLittleEndian)),
    ]


def test_get_generator_honours_cancel_between_sub_operations(node):
    ctx, st = node
    gen = retrieve.get(ctx.config, ctx.sessions, ident("SERIES", SeriesInstanceUID=st.philips_series),
                       storage_dir=ctx.storage_dir, is_cancelled=lambda: len(sent) >= 2)
    sent: list = []
    assert next(gen) == 10  # number of sub-operations first
    statuses = []
    for status, ds in gen:
        statuses.append(status)
        if ds is not None:
            sent.append(ds.SOPInstanceUID)
    assert statuses == [retrieve.PENDING, retrieve.PENDING, retrieve.CANCEL]
    assert sent == [st.philips_sops[55], st.philips_sops[56]]  # in series order, as stored
