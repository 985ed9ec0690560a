"""dicomnode.qr.transfer: the contexts proposed and each stored file sent byte for byte or transcoded,
against a real pynetdicom storage SCP that captures the dataset bytes exactly as they arrived."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.filereader import read_dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from conftest import CT_FIXTURES
from dicomnode.qr import transfer
from qr_data import big_endian_copy, capturing_scp, stored_bytes

SLICES = CT_FIXTURES / "slices"
GE = CT_FIXTURES / "series" / "dcmqi_ge_3slice"


def send_files(port: int, files: list[Path]) -> list[int]:
    infos = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(ae_title="SENDER")
    assoc = ae.associate("127.0.0.1", port, ae_title="CAPTURE", contexts=transfer.storage_contexts(
        (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in infos))
    assert assoc.is_established
    try:
        return [transfer.send_stored(assoc, f, ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID,
                                     originator_ae="NODE", originator_msg_id=7) for f, ds in zip(files, infos)]
    finally:
        assoc.release()


def decoded(ts: str, data: bytes):
    uid = UID(ts)
    ds = read_dataset(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return ds


def test_contexts_per_stored_syntax_plus_native_fallback_within_128():
    j2k = "1.2.840.10008.1.2.4.90"
    got = [(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in transfer.storage_contexts(
        [(CTImageStorage, j2k), (CTImageStorage, ImplicitVRLittleEndian), (CTImageStorage, j2k)])]
    assert got == [(CTImageStorage, (j2k,)), (CTImageStorage, (ImplicitVRLittleEndian,)),
                   (CTImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian))]
    many = [(f"1.2.3.{i}", ts) for i in range(100) for ts in (j2k, ExplicitVRBigEndian)]
    contexts = transfer.storage_contexts(many)
    assert len(contexts) == 128
    fallback = {cx.abstract_syntax for cx in contexts if tuple(cx.transfer_syntax) == transfer.NATIVE}
    assert fallback == {f"1.2.3.{i}" for i in range(100)}  # every SOP class keeps its fallback


def test_sent_byte_for_byte_when_the_stored_syntax_is_accepted(tmp_path):
    """Explicit and implicit VR (with group lengths), deflated, JPEG 2000 and big endian files: the bytes
    that arrive are the stored dataset bytes."""
    files = [*sorted(GE.glob("*.dcm"))[:1], SLICES / "ctimage_deflated.dcm", SLICES / "ctimage_j2k_lossless_90.dcm",
             SLICES / "pydicom_ct_small.dcm", big_endian_copy(SLICES / "pydicom_ct_small.dcm", tmp_path / "be.dcm")]
    with capturing_scp() as (port, received):
        for f in files:  # one association per file: two fixtures share a SOP Instance UID
            assert send_files(port, [f]) == [0x0000]
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            ts, data = received.pop(uid)
            assert ts == pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
            assert data == stored_bytes(f), f"{f.name}: not sent byte for byte"
    assert b"\x08\x00\x00\x00" in stored_bytes(files[0])[:8]  # the GE file does carry a group length


def test_transcoded_when_only_little_endian_is_accepted(tmp_path, caplog):
    files = [big_endian_copy(SLICES / "pydicom_ct_small.dcm", tmp_path / "be.dcm"), sorted(GE.glob("*.dcm"))[0]]
    caplog.set_level("INFO", logger="dicomnode.qr.transfer")
    with capturing_scp([ExplicitVRLittleEndian]) as (port, received):
        assert send_files(port, files) == [0x0000, 0x0000]
    for f in files:
        stored = pydicom.dcmread(f)
        ts, data = received[stored.SOPInstanceUID]
        assert ts == ExplicitVRLittleEndian
        got = decoded(ts, data)
        assert np.array_equal(got.pixel_array, stored.pixel_array)
        assert got.ImagePositionPatient == stored.ImagePositionPatient and got.Rows == stored.Rows
    logged = caplog.text
    assert "transcoded Explicit VR Big Endian -> Explicit VR Little Endian" in logged
    assert "transcoded Implicit VR Little Endian -> Explicit VR Little Endian" in logged


def test_compressed_decoded_with_the_installed_plugins(tmp_path):
    files = [SLICES / "ctimage_j2k_lossless_90.dcm", SLICES / "ctimage_rle.dcm"]
    for f in files:
        with capturing_scp([ImplicitVRLittleEndian]) as (port, received):
            assert send_files(port, [f]) == [0x0000]
        stored = pydicom.dcmread(f)
        ts, data = received[stored.SOPInstanceUID]
        assert ts == ImplicitVRLittleEndian
        assert np.array_equal(decoded(ts, data).pixel_array, stored.pixel_array)  # lossless


def test_failures_are_statuses_not_exceptions(tmp_path):
    """Only JPEG baseline accepted: a JPEG 2000 file cannot be transcoded to it; a missing file and a SOP
    class without an accepted context are refused before anything is sent."""
    j2k = SLICES / "ctimage_j2k_lossless_90.dcm"
    ds = pydicom.dcmread(j2k, stop_before_pixels=True)
    with capturing_scp(["1.2.840.10008.1.2.4.50"]) as (port, received):
        ae = AE(ae_title="SENDER")
        assoc = ae.associate("127.0.0.1", port, ae_title="CAPTURE",
                             contexts=transfer.storage_contexts([(CTImageStorage, "1.2.840.10008.1.2.4.50")]))
        assert assoc.is_established
        try:
            assert transfer.send_stored(assoc, j2k, CTImageStorage, ds.SOPInstanceUID,
                                        ds.file_meta.TransferSyntaxUID) == transfer.CANNOT_TRANSCODE
            assert transfer.send_stored(assoc, tmp_path / "gone.dcm", CTImageStorage, "1.2.3",
                                        ExplicitVRLittleEndian) == transfer.CANNOT_READ
            assert transfer.send_stored(assoc, j2k, "1.2.840.10008.5.1.4.1.1.4", ds.SOPInstanceUID,
                                        ds.file_meta.TransferSyntaxUID) == transfer.NO_CONTEXT
        finally:
            assoc.release()
    assert not received
