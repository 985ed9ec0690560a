"""Reading native little-endian slices straight from their bytes (dicomnode.classification.imaging.native).

The native reader must give exactly what the pydicom path gives (the same SliceHeader, the same HU array)
wherever it answers, and leave everything else to pydicom (None), never raising on bad input.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import CT_FIXTURES, SHARED_DATA
from dicomnode.classification.imaging.native import NATIVE_LITTLE_ENDIAN, read_native_slice
from dicomnode.classification.imaging.pixels import dataset_to_hu
from dicomnode.classification.imaging.series import headers_from_dataset

REAL_FILES = sorted({*CT_FIXTURES.glob("**/*.dcm"), *(SHARED_DATA / "ct").glob("**/*.dcm")})
IMPLICIT = CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm"  # Implicit VR Little Endian, GE
EXPLICIT = CT_FIXTURES / "slices" / "pydicom_ct_small.dcm"  # Explicit VR Little Endian


def _pydicom_path(path: Path):
    ds = pydicom.dcmread(path)
    return headers_from_dataset(ds, path), dataset_to_hu(ds, None)


def _assert_same_as_pydicom(path: Path) -> None:
    native = read_native_slice(path)
    assert native is not None, f"{path.name}: the native reader left it to pydicom"
    headers, hu = _pydicom_path(path)
    assert [native[0]] == headers
    assert native[1].dtype == hu.dtype and native[1].flags.c_contiguous
    np.testing.assert_array_equal(native[1], hu)


def _handled_natively(ds: Dataset) -> bool:
    return (str(ds.file_meta.TransferSyntaxUID) in NATIVE_LITTLE_ENDIAN and int(ds.get("NumberOfFrames", 1) or 1) == 1
            and "SharedFunctionalGroupsSequence" not in ds)


def test_real_files_cover_both_native_syntaxes_and_others():
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in REAL_FILES}
    assert NATIVE_LITTLE_ENDIAN <= syntaxes
    assert len(syntaxes - NATIVE_LITTLE_ENDIAN) >= 3


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_real_file_reads_as_pydicom_reads_it_or_is_left_to_pydicom(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if _handled_natively(ds):
        _assert_same_as_pydicom(path)
    else:  # compressed, big endian, deflated, enhanced multi-frame
        assert read_native_slice(path) is None


def _rewrite(src: Path, dst: Path, change) -> Path:
    ds = pydicom.dcmread(src)
    change(ds)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.mark.parametrize("src", [IMPLICIT, EXPLICIT], ids=["implicit", "explicit"])
@pytest.mark.parametrize("representation", [0, 1])
def test_unused_high_bits_are_masked_or_sign_extended_as_pydicom_does(tmp_path, src, representation):
    def change(ds):
        stored = ds.pixel_array.astype(np.int32) & 0x0FFF
        noise = np.random.default_rng(1).integers(0, 16, stored.shape) << 12  # garbage in the 4 unused bits
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = representation, 12, 11
        ds.PixelData = (stored | noise).astype("<u2").tobytes()

    path = _rewrite(src, tmp_path / "12bit.dcm", change)
    _assert_same_as_pydicom(path)
    stored = read_native_slice(path)[1]
    assert (stored.min() < -1024) == (representation == 1)  # negative stored values only when signed


@pytest.mark.parametrize("src", [IMPLICIT, EXPLICIT], ids=["implicit", "explicit"])
def test_sequences_of_undefined_length_before_the_pixels_are_skipped(tmp_path, src):
    def change(ds):
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = "1.2.3.4"
        item.AnatomicRegionSequence = Sequence([inner])
        ds.ReferencedImageSequence = Sequence([item, copy.deepcopy(item)])
        for elem in (ds["ReferencedImageSequence"], item["AnatomicRegionSequence"]):
            elem.is_undefined_length = True
        for it in ds.ReferencedImageSequence:
            it.is_undefined_length_sequence_item = True

    path = _rewrite(src, tmp_path / "sequences.dcm", change)
    raw = path.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in raw and b"\xfe\xff\x0d\xe0" in raw  # delimiters written: undefined lengths
    _assert_same_as_pydicom(path)


def test_eight_bit_monochrome1_and_a_prone_slice(tmp_path):
    def eight_bit(ds):
        pixels = (ds.pixel_array.astype(np.int32) // 16 & 0xFF).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = pixels.tobytes()

    def prone(ds):
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]

    _assert_same_as_pydicom(_rewrite(EXPLICIT, tmp_path / "8bit.dcm", eight_bit))
    _assert_same_as_pydicom(_rewrite(IMPLICIT, tmp_path / "prone.dcm", prone))


@pytest.mark.parametrize("change", [
    lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.\u00e9"),  # not ASCII
    lambda ds: setattr(ds, "Modality", " CT"),  # padding that stripping rules could read differently
    lambda ds: setattr(ds, "InstanceNumber", "1.0"),  # pydicom reads this IS; the native reader does not try
    lambda ds: setattr(ds, "ImagePositionPatient", ""),  # empty value
    lambda ds: setattr(ds, "PixelData", ds.PixelData[:-2]),  # Pixel Data shorter than Rows x Columns
    lambda ds: setattr(ds, "SamplesPerPixel", 3),
], ids=["non-ascii-uid", "space-padded-cs", "decimal-is", "empty-ipp", "short-pixel-data", "colour"])
def test_what_the_native_reader_is_not_sure_of_goes_to_pydicom(tmp_path, change):
    path = _rewrite(EXPLICIT, tmp_path / "odd.dcm", change)
    assert read_native_slice(path) is None


@pytest.mark.parametrize("src", [IMPLICIT, EXPLICIT], ids=["implicit", "explicit"])
def test_truncated_or_corrupt_files_give_none_never_an_exception(tmp_path, src):
    raw = src.read_bytes()
    at = raw.rfind(b"\xe0\x7f\x10\x00")  # Pixel Data (7FE0,0010): its value's last byte is cut off
    pixels_end = (at + 8 + struct.unpack_from("<L", raw, at + 4)[0] if src == IMPLICIT
                  else at + 12 + struct.unpack_from("<L", raw, at + 8)[0])
    path = tmp_path / "cut.dcm"
    for cut in [0, 100, 131, 140, 200, 400, 700, 1000, 2000, len(raw) // 2, pixels_end - 1]:
        path.write_bytes(raw[:cut])
        assert read_native_slice(path) is None, cut
    rng = np.random.default_rng(7)
    for _ in range(50):  # random bytes over the header
        junk = bytearray(raw)
        at = int(rng.integers(132, 1200))
        junk[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(junk))
        result = read_native_slice(path)  # must not raise, whatever the damage
        assert result is None or (len(result) == 2 and result[1].ndim == 2)
    assert read_native_slice(tmp_path / "missing.dcm") is None
