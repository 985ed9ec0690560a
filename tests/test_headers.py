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
