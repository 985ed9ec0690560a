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
