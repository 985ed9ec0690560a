"""C-MOVE / C-GET SCP with DCMTK's movescu / getscu and pynetdicom as peers on loopback.

The move destination is a real pynetdicom Storage SCP registered in the node's config; what it receives
is compared byte for byte with the files the node stored.
"""

from __future__ import annotations

import logging
import subprocess
from io import BytesIO
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
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


def test_c_cancel_from_the_get_scu_stops_the_sub_operations(node):
    """The SCU sends C-CANCEL while the second C-STORE is in flight (from its C-STORE handler, before
    answering it): the node finishes that one and answers 0xFE00 with 8 remaining."""
    ctx, st = node
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.90"])
    got: list[str] = []
    holder: dict = {}

    def on_store(event):
        got.append(str(event.request.AffectedSOPInstanceUID))
        if len(got) == 2:
            holder["assoc"].send_c_cancel(1, holder["cx"])
        return 0x0000

    assoc = ae.associate("127.0.0.1", ctx.config.port, ae_title="DICOMNODE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    holder["assoc"] = assoc
    holder["cx"] = next(cx.context_id for cx in assoc.accepted_contexts
                        if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet)
    try:
        responses = list(assoc.send_c_get(ident("SERIES", SeriesInstanceUID=st.philips_series),
                                          StudyRootQueryRetrieveInformationModelGet, msg_id=1))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0xFE00
    assert (final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations) == (2, 8)
    assert got == [st.philips_sops[55], st.philips_sops[56]]  # in series order, as stored


# Sending what the peer can take, byte for byte where it can (issue 12) ---------------------------------

def _stored_path(ctx, sop_uid: str) -> Path:
    with ctx.sessions() as s:
        return ctx.storage_dir / s.query(Instance.path).filter(Instance.sop_instance_uid == sop_uid).scalar()


def _store_extra(ctx, tmp_path) -> dict[str, str]:
    """Store a big endian and a deflated instance in a new series; returns {name: SOP Instance UID}."""
    series = pydicom.uid.generate_uid()
    out = {}
    for name, src in (("be", qr_data.SMALL), ("deflated", qr_data.CT_FIXTURES / "slices" / "ctimage_deflated.dcm")):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if name == "be":
            path = qr_data.big_endian_copy(path, tmp_path / "be-converted.dcm", new_uid=False)
        qr_data._store(ctx, path.read_bytes())
        out[name] = ds.SOPInstanceUID
    out["series"] = series
    return out


def test_movescu_delivers_the_stored_bytes_unchanged(node, tmp_path):
    """A byte-capturing destination that accepts every syntax: each dataset that arrives is the stored
    dataset, byte for byte (group lengths, implicit VR, deflate, JPEG 2000, big endian as stored)."""
    ctx, st = node
    extra = _store_extra(ctx, tmp_path)
    with qr_data.capturing_scp(ae_title="VIEWER") as (scp_port, received):
        register(ctx, "VIEWER", scp_port)
        for series in (st.philips_series, st.ge_series, extra["series"]):
            proc = subprocess.run([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aem", "VIEWER", "-aec", "DICOMNODE",
                                   "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series}",
                                   "127.0.0.1", str(ctx.config.port)], capture_output=True, timeout=120)
            assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    expected = set(st.philips_sops.values()) | {uid for uid in st.files if uid not in st.philips_sops.values()} \
        | {extra["be"], extra["deflated"]}
    assert set(received) == expected
    for uid, (ts, data) in received.items():
        stored = _stored_path(ctx, uid)
        assert ts == pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert data == qr_data.stored_bytes(stored), f"{uid} not sent byte for byte"


@pytest.mark.parametrize("peer", ["pynetdicom", "getscu"])
def test_big_endian_instance_is_transcoded_for_a_little_endian_peer(node, tmp_path, peer, caplog):
    ctx, st = node
    extra = _store_extra(ctx, tmp_path)
    caplog.set_level(logging.INFO, logger="dicomnode")
    stored = pydicom.dcmread(_stored_path(ctx, extra["be"]))
    if peer == "pynetdicom":  # as C-MOVE destination accepting little endian only
        with storage_scp(transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as (scp_port, received):
            register(ctx, "VIEWER", scp_port)
            status, _ = c_move(ctx.config.port, ident("IMAGE", SeriesInstanceUID=extra["series"],
                                                      SOPInstanceUID=extra["be"]), "VIEWER")
        assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 1
        ts, data = received[extra["be"]]
        got = pydicom.filereader.read_dataset(BytesIO(data), ts == ImplicitVRLittleEndian, True)
        got.file_meta = pydicom.dataset.FileMetaDataset()
        got.file_meta.TransferSyntaxUID = ts
    else:  # DCMTK getscu proposes the little endian syntaxes only
        proc = _getscu(ctx, tmp_path / "got", ["QueryRetrieveLevel=IMAGE", f"SeriesInstanceUID={extra['series']}",
                                                f"SOPInstanceUID={extra['be']}"])
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        (path,) = (tmp_path / "got").iterdir()
        got = pydicom.dcmread(path)
        assert got.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
    assert np.array_equal(got.pixel_array, stored.pixel_array)
    assert "transcoded Explicit VR Big Endian" in caplog.text


def test_unreachable_known_destination_fails_the_sub_operations(node, caplog):
    """A configured destination that is down: 0xA702 with every sub-operation failed (not 0xA801), and a
    log line naming the AE, its host and port and the error."""
    ctx, st = node
    caplog.set_level(logging.INFO, logger="dicomnode")
    down = free_port()  # nothing listens there
    register(ctx, "DOWNSTREAM", down)
    status, failed = c_move(ctx.config.port, ident("SERIES", SeriesInstanceUID=st.philips_series), "DOWNSTREAM")
    assert status.Status == 0xA702
    assert (status.NumberOfFailedSuboperations, status.NumberOfCompletedSuboperations) == (10, 0)
    assert set(failed.FailedSOPInstanceUIDList) == set(st.philips_sops.values())
    line = next(r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage())
    assert "DOWNSTREAM" in line and f"127.0.0.1:{down}" in line and "Connection" in line


def test_two_concurrent_moves_to_one_destination_each_use_their_own_association(node):
    """Two moves to one AE at once: each sub-association carries exactly its own move's instances."""
    import threading

    ctx, st = node
    by_assoc: dict[int, set[str]] = {}

    def on_store(event):
        by_assoc.setdefault(id(event.assoc), set()).add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.add_supported_context(CTImageStorage, AllTransferSyntaxes)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    register(ctx, "VIEWER", port)
    results: dict[str, int] = {}
    try:
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(
            s, c_move(ctx.config.port, ident("SERIES", SeriesInstanceUID=s), "VIEWER")[0].Status))
            for s in (st.philips_series, st.ge_series)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.shutdown()
    assert results == {st.philips_series: 0, st.ge_series: 0}
    ge = {uid for uid in st.files if uid not in st.philips_sops.values()}
    assert sorted(map(sorted, by_assoc.values())) == sorted([sorted(st.philips_sops.values()), sorted(ge)])


def test_standard_retrieve_by_sop_instance_uids_after_an_image_level_find(node, tmp_path):
    """PS3.4 retrieve of a region: C-FIND at IMAGE level by BodyPartExamined, then C-MOVE and C-GET by the
    list of SOP Instance UIDs found (the unique keys), not by the region key."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ctx, st = node
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", ctx.config.port, ae_title="DICOMNODE")
    try:
        found = [ds.SOPInstanceUID for status, ds in assoc.send_c_find(
            ident("IMAGE", StudyInstanceUID=st.philips_study, SeriesInstanceUID=st.philips_series,
                  BodyPartExamined="LIVER", SOPInstanceUID=""), StudyRootQueryRetrieveInformationModelFind)
            if status.Status == 0xFF00]
    finally:
        assoc.release()
    assert set(found) == st.liver_sops()
    keys = dict(StudyInstanceUID=st.philips_study, SeriesInstanceUID=st.philips_series, SOPInstanceUID=found)
    with storage_scp() as (scp_port, received):
        register(ctx, "VIEWER", scp_port)
        status, _ = c_move(ctx.config.port, ident("IMAGE", **keys), "VIEWER")
    assert status.Status == 0x0000 and set(received) == st.liver_sops()
    uid_list = "\\".join(found)
    proc = _getscu(ctx, tmp_path / "got", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={st.philips_study}",
                                           f"SeriesInstanceUID={st.philips_series}", f"SOPInstanceUID={uid_list}"])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    got = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (tmp_path / "got").iterdir()}
    assert got == st.liver_sops()


def test_qr_only_for_listed_peers_echo_and_store_stay_open(node, caplog):
    """An AE outside qr.allowed_peers (and not a move destination) gets 0x0124 for C-FIND, C-MOVE and
    C-GET, with a log line naming it and its address; its C-ECHO still succeeds. A listed AE from another
    host is refused too; a move destination may query."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    ctx, st = node
    caplog.set_level(logging.INFO, logger="dicomnode")
    ctx.config.qr.allowed_peers.append(qr_data.AllowedPeer(ae_title="ELSEWHERE", host="10.9.9.9"))
    ctx.config.qr.move_destinations.append(RemoteAE(ae_title="VIEWER", host="127.0.0.1", port=free_port()))

    def statuses(calling: str) -> tuple[int, ...]:
        ae = AE(ae_title=calling)
        for cx in (Verification, StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                   StudyRootQueryRetrieveInformationModelGet):
            ae.add_requested_context(cx)
        assoc = ae.associate("127.0.0.1", ctx.config.port, ae_title="DICOMNODE")
        assert assoc.is_established
        try:
            q = ident("SERIES", SeriesInstanceUID=st.philips_series)
            echo = assoc.send_c_echo().Status
            find = [s.Status for s, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)][-1]
            move = [s.Status for s, _ in assoc.send_c_move(q, "VIEWER", StudyRootQueryRetrieveInformationModelMove)][-1]
            get = [s.Status for s, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)][-1]
            return echo, find, move, get
        finally:
            assoc.release()

    assert statuses("STRANGER") == (0x0000, 0x0124, 0x0124, 0x0124)
    assert statuses("ELSEWHERE") == (0x0000, 0x0124, 0x0124, 0x0124)
    assert statuses("VIEWER")[1] == 0x0000  # a move destination is a known peer
    refused = [r.getMessage() for r in caplog.records if "0x0124" in r.getMessage()]
    assert any("STRANGER" in m and "127.0.0.1" in m and "C-FIND" in m for m in refused)
    assert any("STRANGER" in m and "C-MOVE" in m for m in refused) and any("C-GET" in m for m in refused)
    ctx.config.qr.allow_any_peer = True
    assert statuses("STRANGER")[1] == 0x0000
