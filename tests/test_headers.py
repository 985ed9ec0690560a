"""The fast header reader gives exactly what a full pydicom read gives, on real files and broken ones."""

from __future__ import annotations

import pytest

from conftest import CT_FIXTURES, SHARED_DATA
from dicomnode.receive.headers import UndecodableDataset, _read_header_pydicom, read_header
from dicomnode.receive.storage import InvalidUID

FILES = sorted(CT_FIXTURES.rglob("*.dcm")) + sorted((SHARED_DATA / "ct").rglob("*.dcm"))


def outcome(reader, data: bytes):
    try:
        return reader(data)
    except (UndecodableDataset, InvalidUID) as exc:
        return type(exc).__name__


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_fast_reader_agrees_with_pydicom(path):
    data = path.read_bytes()
    header = outcome(read_header, data)
    assert header == outcome(_read_header_pydicom, data)
    # Every real file reads, except one whose SOPInstanceUID is a hex hash (refused: 0xC220).
    assert not isinstance(header, str) or (path.name.endswith("bad_sequence.dcm") and header == "InvalidUID")
    # Cut short, the two readers still agree (both refuse, or both read the same header).
    for cut in (len(data) // 2, 2000, 400):
        assert outcome(read_header, data[:cut]) == outcome(_read_header_pydicom, data[:cut])


def test_non_ascii_text_is_decoded_with_its_character_set(tmp_path):
    from io import BytesIO

    import pydicom
    from pydicom.filewriter import dcmwrite

    ds = pydicom.dcmread(CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "Tórax"
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    assert read_header(buf.getvalue()).study_description == "Tórax"


NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
NOT_WALKED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")  # deflate, big endian: the readers use pydicom


def _walked_slices() -> list:
    """The single slices whose dataset the walker reads (not deflated, not big endian)."""
    from dicomnode.receive.dataset_check import file_meta_info

    return [p for p in FILES if p.parent.name == "slices" and file_meta_info(p.read_bytes())[1] not in NOT_WALKED]


@pytest.mark.parametrize("path", _walked_slices(), ids=lambda p: p.name)
def test_top_level_walk_meets_every_element_pydicom_reads(path):
    """The one element walk of the header reader and the native slice reader: the same top-level tags,
    VRs, lengths and offsets that pydicom finds, sequences of undefined length included and stepped over."""
    import pydicom

    from dicomnode.receive.dataset_check import UNDEFINED_LENGTH, file_meta_info, top_level_elements

    data = path.read_bytes()
    offset, syntax = file_meta_info(data)
    ds = pydicom.dcmread(path, defer_size=0)
    expected = [(int(e.tag), e.VR) for e in ds]  # top level, file order
    walked = list(top_level_elements(data, offset, syntax == NATIVE_LE[0]))  # encapsulated Pixel Data too
    assert [t for t, *_ in walked] == [t for t, _ in expected]
    for (tag, vr, length, value_pos), (_, pd_vr) in zip(walked, expected):
        if vr is not None:  # pydicom gives UN elements the VR of its dictionary
            assert vr.decode() in (pd_vr, "UN")
        if length != UNDEFINED_LENGTH:
            assert value_pos + length <= len(data)
    # an explicit VR of two lower-case letters is refused by name, not walked as garbage
    if syntax != NATIVE_LE[0]:
        broken = data[:offset + 4] + b"xx" + data[offset + 6:]  # the VR of the first element
        with pytest.raises(ValueError, match=r"no valid explicit VR"):
            list(top_level_elements(broken, offset, False))
