"""The Part 10 byte walk (dicomnode.part10): the top-level elements pydicom reads, and the structural check
that refuses a cut dataset, on real files."""

from __future__ import annotations

import pytest

from conftest import CT_FIXTURES, SHARED_DATA
from dicomnode.part10 import UNDEFINED_LENGTH, IncompleteDataset, check_complete, file_meta_info, top_level_elements

FILES = sorted(CT_FIXTURES.rglob("*.dcm")) + sorted((SHARED_DATA / "ct").rglob("*.dcm"))

NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
NOT_WALKED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")  # deflate, big endian: the readers use pydicom


def _walked_slices() -> list:
    """The single slices whose dataset the walker reads (not deflated, not big endian)."""
    from dicomnode.part10 import file_meta_info

    return [p for p in FILES if p.parent.name == "slices" and file_meta_info(p.read_bytes())[1] not in NOT_WALKED]


@pytest.mark.parametrize("path", _walked_slices(), ids=lambda p: p.name)
def test_top_level_walk_meets_every_element_pydicom_reads(path):
    """The one element walk of the header reader and the native slice reader: the same top-level tags,
    VRs, lengths and offsets that pydicom finds, sequences of undefined length included and stepped over."""
    import pydicom

    from dicomnode.part10 import UNDEFINED_LENGTH, file_meta_info, top_level_elements

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


@pytest.mark.parametrize("path", _walked_slices()[:12], ids=lambda p: p.name)
def test_a_whole_dataset_passes_and_a_cut_inside_any_element_is_refused(path):
    """A cut that ends inside an element's header or value is named by its byte; one that falls exactly
    between two top-level elements is structurally whole and is the header reader's to judge."""
    data = path.read_bytes()
    offset, syntax = file_meta_info(data)
    dataset = data[offset:]
    check_complete(dataset, syntax)
    elements = list(top_level_elements(data, offset, syntax == NATIVE_LE[0]))
    for tag, _vr, length, value_pos in elements[:: max(1, len(elements) // 6)] + elements[-1:]:
        inside = value_pos - offset + (length // 2 if length not in (0, UNDEFINED_LENGTH) else 0) - 1
        with pytest.raises(IncompleteDataset, match=r"at byte \d+"):
            check_complete(dataset[:inside], syntax)


def test_trailing_bytes_and_a_missing_prefix_are_named():
    path = _walked_slices()[0]
    data = path.read_bytes()
    offset, syntax = file_meta_info(data)
    dataset = data[offset:]
    with pytest.raises(IncompleteDataset, match=rf"tag at byte {len(dataset)} needs 4 bytes, only 2 remain"):
        check_complete(dataset + b"\x00\x00", syntax)
    with pytest.raises(IncompleteDataset, match="no DICM prefix"):
        file_meta_info(data[4:])
