"""The listener against real peers on loopback: DCMTK echoscu/storescu and pynetdicom SCUs."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from sqlalchemy import func, select

from conftest import CT_FIXTURES, dcmtk, send_files
from dicomnode.db.models import Instance, Series
from dicomnode.receive.ingest import CANNOT_DECODE, INVALID_UID, OUT_OF_RESOURCES, NodeContext
from dicomnode.receive.listener import start_listener

SERIES_3 = CT_FIXTURES / "series" / "dcmqi_ge_3slice"
SERIES_J2K = CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k"
SLICES = sorted((CT_FIXTURES / "slices").glob("*.dcm"))
SLICES_BY_NAME = {p.name: p for p in SLICES}


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return raw[fh.tell():]


def instance_count(ctx: NodeContext) -> int:
    with ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Instance))


def stored_files(ctx: NodeContext) -> list[Path]:
    return sorted(p for p in ctx.storage_dir.rglob("*") if p.is_file())


@contextlib.contextmanager
def association(port: int, contexts, calling: str = "SCU", called: str = "DICOMNODE"):
    ae = AE(ae_title=calling)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


@contextlib.contextmanager
def raw_sending():
    """pynetdicom sends a file's bytes as they are (no decode/re-encode) while this is active."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def write_part10(ds: pydicom.Dataset, path: Path, ts=ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_echo_with_dcmtk(running_node):
    result = subprocess.run([dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(running_node.config.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_dcmtk_series_is_indexed_once_and_stored_byte_for_byte(running_node):
    port = str(running_node.config.port)
    cmd = [dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", port, "+sd", str(SERIES_3)]
    for _ in range(2):  # the second send is a re-send: no duplicates
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
        assert result.returncode == 0, result.stderr
    assert instance_count(running_node) == 3
    with running_node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Series)) == 1
        rows = s.scalars(select(Instance)).all()
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in SERIES_3.glob("*.dcm")}
    for row in rows:
        stored = running_node.storage_dir / row.path
        assert dataset_bytes(stored) == dataset_bytes(sources[row.sop_instance_uid])
        assert row.size_bytes == stored.stat().st_size
    assert len(stored_files(running_node)) == 3


def test_every_fixture_transfer_syntax_is_accepted_as_sent(running_node):
    files = SLICES + sorted(SERIES_J2K.glob("*.dcm"))
    metas = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    statuses = send_files(running_node.config.port, files)  # one context per (SOP class, syntax) sent
    assert statuses == [0x0000] * len(files)
    with running_node.sessions() as s:
        rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
    # The ctimage_* fixtures are one image in many syntaxes with one SOP Instance UID: the first copy
    # received is kept (duplicate_policy keep), never a second row.
    first_sent: dict[str, tuple[Path, pydicom.Dataset]] = {}
    for path, meta in zip(files, metas):
        first_sent.setdefault(meta.SOPInstanceUID, (path, meta))
    assert set(rows) == set(first_sent)
    for uid, (path, meta) in first_sent.items():
        row = rows[uid]
        assert row.transfer_syntax_uid == meta.file_meta.TransferSyntaxUID
        assert dataset_bytes(running_node.storage_dir / row.path) == dataset_bytes(path), path.name


def test_undecodable_dataset_is_refused_and_nothing_written(running_node, tmp_path):
    good = SLICES[0]
    raw = good.read_bytes()
    header_end = len(raw) - len(dataset_bytes(good))
    # A valid file meta followed by a dataset whose first element claims more bytes than exist.
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(raw[:header_end] + b"\x08\x00\x05\x00CS\xff\x7f" + b"\x00" * 16)
    meta = pydicom.dcmread(good, stop_before_pixels=True).file_meta
    with raw_sending(), association(running_node.config.port,
                                    [(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID]),
                                     (Verification, None)]) as assoc:
        status = assoc.send_c_store(bad).Status
        # The node stays up and the association usable.
        assert assoc.send_c_echo().Status == 0x0000
    assert status == CANNOT_DECODE
    assert instance_count(running_node) == 0
    assert stored_files(running_node) == []


@pytest.mark.parametrize("keyword, value", [
    ("SOPInstanceUID", None),
    ("StudyInstanceUID", None),
    ("SeriesInstanceUID", "../../../../tmp/evil"),
    ("StudyInstanceUID", "1.2.3/../../x"),
    ("SOPInstanceUID", "1.2.03"),
])
def test_missing_or_malformed_uids_are_refused(running_node, tmp_path, keyword, value):
    ds = pydicom.dcmread(SERIES_3 / "01.dcm")
    ds.SOPInstanceUID = generate_uid()
    if value is None:
        del ds[keyword]
    else:
        ds[keyword].value = value
    path = write_part10(ds, tmp_path / "x.dcm")
    with raw_sending(), association(running_node.config.port, [(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        status = assoc.send_c_store(path).Status
    assert status == INVALID_UID
    assert instance_count(running_node) == 0
    assert stored_files(running_node) == []
    assert not Path("/tmp/evil").exists()


def test_every_storage_sop_class_by_default_and_a_list_restricts(node_config, index, caplog):
    """Default (listener.sop_classes: []): every storage SOP class; a list restricts; the log names refusals."""
    private = "1.2.826.0.1.3680043.8.498.999"  # a SOP class pynetdicom does not know
    caplog.set_level("INFO", logger="dicomnode.receive.listener")
    for sop_classes, refused in (([], {private}), (["CTImageStorage"], {private, str(MRImageStorage)})):
        node_config.listener.sop_classes = sop_classes
        server = start_listener(NodeContext(node_config, index[1]))
        try:
            with association(node_config.port, [(MRImageStorage, [ExplicitVRLittleEndian]),
                                                (private, [ExplicitVRLittleEndian]),
                                                (CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
                assert assoc.is_established
                accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
                rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        finally:
            server.shutdown()
            server.server_close()
        assert rejected == refused and CTImageStorage in accepted
    lines = [r.getMessage() for r in caplog.records if "SOP class(es) rejected" in r.getMessage()]
    assert private in lines[0] and "MR Image Storage" not in lines[0]
    assert f"MR Image Storage ({MRImageStorage})" in lines[-1]


def test_out_of_space_answers_a700_and_writes_nothing(node_config, index, tmp_path):
    node_config.listener.min_free_space_mb = 1 << 40  # a floor no disk satisfies
    ctx = NodeContext(node_config, index[1])
    server = start_listener(ctx)
    try:
        with association(node_config.port, [(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
            ds = pydicom.dcmread(SERIES_3 / "01.dcm")
            status = assoc.send_c_store(write_part10(ds, tmp_path / "a.dcm")).Status
    finally:
        server.shutdown()
        server.server_close()
    assert status == OUT_OF_RESOURCES
    assert instance_count(ctx) == 0 and stored_files(ctx) == []


def _listener_with(node_config, index, **security):
    for key, value in security.items():
        setattr(node_config.security, key, value)
    ctx = NodeContext(node_config, index[1])
    server = start_listener(ctx)
    return server


def test_unknown_calling_ae_and_host_are_rejected(node_config, index):
    from dicomnode.config import AllowedPeer

    server = _listener_with(node_config, index, allowed_peers=[AllowedPeer("PACS", ""),
                                                               AllowedPeer("MODALITY", "10.99.99.99")])
    try:
        for calling, expect in (("PACS", True), ("INTRUDER", False), ("MODALITY", False)):
            with association(node_config.port, [(Verification, None)], calling=calling) as assoc:
                assert assoc.is_established is expect, calling
                if not expect:
                    assert assoc.is_rejected
        # DCMTK as the unknown peer: echoscu reports the rejection and fails.
        result = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1",
                                 str(node_config.port)], capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
        assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    finally:
        server.shutdown()
        server.server_close()


def test_wrong_called_ae_title_is_rejected(running_node):
    with association(running_node.config.port, [(Verification, None)], called="SOMEONEELSE") as assoc:
        assert assoc.is_rejected


def test_association_limit(node_config, index):
    node_config.listener.max_associations = 1
    server = _listener_with(node_config, index)
    try:
        with association(node_config.port, [(Verification, None)]) as first:
            assert first.is_established
            with association(node_config.port, [(Verification, None)]) as second:
                assert second.is_rejected
    finally:
        server.shutdown()
        server.server_close()


def test_tls(node_config, index, tmp_path):
    import datetime as dt
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    node_config.security.tls.enabled = True
    node_config.security.tls.certificate = str(cert_path)
    node_config.security.tls.private_key = str(key_path)
    server = _listener_with(node_config, index)
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert_path))
        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node_config.port, ae_title="DICOMNODE", tls_args=(client, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        # Plain TCP to a TLS listener does not get an association.
        plain = AE(ae_title="SCU")
        plain.add_requested_context(Verification)
        plain.acse_timeout = 3
        plain.network_timeout = 3
        assert not plain.associate("127.0.0.1", node_config.port, ae_title="DICOMNODE").is_established
    finally:
        server.shutdown()
        server.server_close()


def _with_meta(path: Path, out: Path, **meta) -> Path:
    """``path``'s dataset bytes as they are, under a file meta with ``meta`` changed (e.g. TransferSyntaxUID)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    file_meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    for key, value in meta.items():
        setattr(file_meta, key, value)
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, file_meta, enforce_standard=True)
    out.write_bytes(buf.getvalue() + dataset_bytes(path))
    return out


def test_pixel_data_encoding_must_match_the_transfer_syntax(running_node, tmp_path):
    """Encapsulated Pixel Data on Explicit VR Little Endian (as odil's store sends), and native Pixel
    Data on a JPEG-LS context: both 0xC210, nothing stored."""
    jpegls = SLICES_BY_NAME["ctimage_jpegls_lossless_80.dcm"]
    native = SLICES_BY_NAME["pydicom_ct_small.dcm"]
    wrong = [_with_meta(jpegls, tmp_path / "encapsulated_as_native.dcm", TransferSyntaxUID=ExplicitVRLittleEndian),
             _with_meta(native, tmp_path / "native_as_jpegls.dcm", TransferSyntaxUID=JPEGLSLossless)]
    assert send_files(running_node.config.port, wrong) == [CANNOT_DECODE, CANNOT_DECODE]
    assert instance_count(running_node) == 0 and stored_files(running_node) == []
    # The same bytes under their own syntaxes are stored.
    assert send_files(running_node.config.port, [jpegls, native]) == [0x0000, 0x0000]


def test_retired_jpeg_syntaxes_are_stored_as_sent_by_dcmtk_in_one_association(running_node, tmp_path):
    from conftest import shared_ct

    folder = tmp_path / "mixed"
    folder.mkdir()
    retired = [shared_ct("slices/ctimage_jpeg_spectral_53_retired.dcm"),
               shared_ct("slices/ctimage_jpeg_progressive_55_retired.dcm")]
    others = [SLICES_BY_NAME["pydicom_ct_small.dcm"], SLICES_BY_NAME["barre_chest_scout_jpegll.dcm"]]
    # retired syntaxes between others: a sender stops at the first file whose context was refused
    files = [others[0], retired[0], others[1], retired[1]]
    for i, path in enumerate(files):
        (folder / f"{i:02d}.dcm").write_bytes(path.read_bytes())
    # DCMTK's dcmsend proposes one presentation context per (SOP class, transfer syntax) of the files
    # and sends each as it is. (storescu proposes native syntaxes only and decompresses each file itself,
    # which it cannot do for .55: it then fails on its own side, "unable to convert dataset".)
    result = subprocess.run([dcmtk("dcmsend"), "--decompress-never", "-aec", "DICOMNODE", "127.0.0.1",
                             str(running_node.config.port), "+sd", str(folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with running_node.sessions() as s:
        rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
    assert len(rows) == 4
    for path in files:
        sent = pydicom.dcmread(path)
        row = rows[sent.SOPInstanceUID]
        assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        # DCMTK re-encodes the header elements it sends; the pixel data (the fragments) are as in the file
        stored = pydicom.dcmread(running_node.storage_dir / row.path)
        assert stored.PixelData == sent.PixelData, path.name
        if path in retired:  # (these two DCMTK sends as they are in the file)
            assert dataset_bytes(running_node.storage_dir / row.path) == dataset_bytes(path), path.name


def test_c_store_request_without_its_uid_is_answered(running_node, tmp_path):
    """pynetdicom drops a C-STORE request whose Affected SOP Instance UID is empty without answering;
    the node answers 0xC220 (and logs it)."""
    from pynetdicom import evt

    path = _with_meta(SLICES_BY_NAME["pydicom_ct_small.dcm"], tmp_path / "a.dcm")
    responses = []
    ae = AE(ae_title="SCU")
    ae.dimse_timeout = 30
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", running_node.config.port, ae_title="DICOMNODE", evt_handlers=[
        (evt.EVT_DIMSE_RECV, lambda event: responses.append(getattr(event.message.command_set, "Status", None)))])
    try:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info

        # The request's UID comes from the file meta: written as is (empty) after the association.
        meta.MediaStorageSOPInstanceUID = ""
        del meta.FileMetaInformationGroupLength
        buf = DicomBytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=False)
        path.write_bytes(buf.getvalue() + dataset_bytes(SLICES_BY_NAME["pydicom_ct_small.dcm"]))
        with raw_sending():
            assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    assert responses == [INVALID_UID]
    assert instance_count(running_node) == 0
