"""The listener's fast paths produce exactly the bytes pynetdicom's own code produces."""

from __future__ import annotations

import pytest
from pydicom.dataset import FileMetaDataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.pdu import P_DATA_TF

from dicomnode.receive.fastpath import part10_bytes, store_response_pdu

CASES = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),      # odd-length UIDs
    ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.3.4.56", "1.2.840.10008.1.2.4.90"),  # even and odd
]


@pytest.mark.parametrize("sop_class, sop_instance, syntax", CASES)
def test_part10_bytes_equal_pynetdicoms_file_meta(sop_class, sop_instance, syntax):
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    dataset = b"\x08\x00\x16\x00UI\x04\x001.2\x00"
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + dataset
    assert part10_bytes(sop_class, sop_instance, syntax, dataset) == expected


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210])
@pytest.mark.parametrize("sop_class, sop_instance, _", CASES)
def test_store_response_pdu_equals_pynetdicoms_encoding(sop_class, sop_instance, _, status):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    message.context_id = 3
    (p_data,) = list(message.encode_msg(3, 2 ** 20))  # one P-DATA primitive: the command set
    pdu = P_DATA_TF()
    pdu.from_primitive(p_data)
    assert store_response_pdu(3, 7, sop_class, sop_instance, status) == pdu.encode()


# Engagement on the pinned pynetdicom, and stepping aside on another -------------------------------

def _pinned_spec():
    import re
    import tomllib
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (dep,) = [d for d in project["dependencies"] if re.match(r"pynetdicom\b", d)]
    return SpecifierSet(dep[len("pynetdicom"):])


def _acceptor_associations(server):
    return [a for a in server.ae.active_associations if a.is_acceptor]


def _store_one(port: int) -> int:
    import pydicom
    from pynetdicom import AE, _config

    from conftest import CT_FIXTURES

    path = CT_FIXTURES / "slices" / "pydicom_ct_small.dcm"
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title="SCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    chunked_before, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return assoc.send_c_store(path).Status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked_before
        assoc.release()


def test_fast_path_engages_on_the_pinned_pynetdicom(node_ctx, monkeypatch, caplog):
    import logging

    import pynetdicom

    from dicomnode.receive import fastpath
    from dicomnode.receive.listener import start_listener

    assert pynetdicom.__version__ in _pinned_spec(), "pyproject's pin and the installed pynetdicom disagree"
    monkeypatch.setattr(fastpath, "_ENGAGED", [])  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="dicomnode.receive.fastpath"):
        server = start_listener(node_ctx)
    try:
        assert "listener fast path engaged (pynetdicom " in caplog.text
        seen = []
        from pynetdicom import evt

        # The association the node accepted reads through FastAssociationSocket and wakes early.
        server.bind(evt.EVT_C_STORE, lambda event: seen.append(
            (type(event.assoc.dul.socket), hasattr(event.assoc, "_dicomnode_wait"))) or 0x0000)
        assert _store_one(node_ctx.config.port) == 0x0000
        assert seen == [(fastpath.FastAssociationSocket, True)]
    finally:
        server.shutdown()
        server.server_close()


def test_fast_path_steps_aside_when_pynetdicom_lacks_an_internal(node_ctx, monkeypatch, caplog):
    """A pynetdicom whose DUL no longer defines _read_pdu_data (renamed, as an upgrade might):
    the listener logs that the fast path is off and serves with pynetdicom's own code."""
    import logging

    from pynetdicom.dul import DULServiceProvider

    from dicomnode.receive import fastpath
    from dicomnode.receive.listener import start_listener

    renamed = DULServiceProvider._read_pdu_data
    monkeypatch.setattr(DULServiceProvider, "_read_pdu", renamed, raising=False)
    monkeypatch.delattr(DULServiceProvider, "_read_pdu_data")
    # pynetdicom's own callers still find it under the old name (only the class no longer has it).
    monkeypatch.setattr(DULServiceProvider, "__getattr__",
                        lambda self, name: renamed.__get__(self) if name == "_read_pdu_data" else
                        object.__getattribute__(self, name), raising=False)
    monkeypatch.setattr(fastpath, "_ENGAGED", [])
    with caplog.at_level(logging.INFO, logger="dicomnode.receive.fastpath"):
        server = start_listener(node_ctx)
    try:
        assert "fast path NOT engaged" in caplog.text and "DULServiceProvider._read_pdu_data" in caplog.text
        seen = []
        from pynetdicom import evt

        server.bind(evt.EVT_C_STORE, lambda event: seen.append(
            (type(event.assoc.dul.socket).__name__, hasattr(event.assoc, "_dicomnode_wait"))) or 0x0000)
        assert _store_one(node_ctx.config.port) == 0x0000
        assert seen == [("AssociationSocket", False)]
    finally:
        server.shutdown()
        server.server_close()
