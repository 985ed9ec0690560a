"""Decoding real CT to HU in display orientation (dicomnode.classification.imaging.pixels)."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest

from conftest import CT_FIXTURES, shared_ct
from dicomnode.classification.imaging.pixels import (
    dataset_to_hu,
    display_turn,
    image_orientation,
    pixel_spacing_mm,
    read_hu,
    slice_normal,
)

FIXTURE_FILES = sorted(CT_FIXTURES.glob("**/*.dcm"))


def test_fixtures_cover_the_transfer_syntaxes():
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in FIXTURE_FILES}
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
               "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"):
        assert ts in syntaxes


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_every_fixture_decodes_to_sane_hu(path):
    ds = pydicom.dcmread(path)
    hu = dataset_to_hu(ds)
    assert hu.dtype == np.float32 and hu.ndim == 2 and hu.flags.c_contiguous
    assert hu.shape == (ds.Rows, ds.Columns)
    assert np.isfinite(hu).all()
    assert -4100 <= hu.min() < hu.max() <= 4100
    if "LOCALIZER" not in list(ds.ImageType):
        # Axial CT: air outside the body (or padding below it) and soft tissue inside.
        assert hu.min() <= -850, "no air/padding: the modality LUT was not applied"
        soft = ((hu > -200) & (hu < 300)).mean()
        assert soft > 0.1, f"only {soft:.1%} soft tissue"
    spacing = pixel_spacing_mm(ds)
    assert spacing is not None and all(0.1 < s < 5 for s in spacing)


def test_lossless_syntaxes_decode_identically():
    ref = read_hu(CT_FIXTURES / "slices" / "ctimage_deflated.dcm")[0]
    for name in ("ctimage_j2k_lossless_90", "ctimage_jpeg_lossless_57", "ctimage_jpegls_lossless_80", "ctimage_rle"):
        hu = read_hu(CT_FIXTURES / "slices" / f"{name}.dcm")[0]
        np.testing.assert_array_equal(hu, ref, err_msg=name)


def test_j2k_series_equals_the_uncompressed_series():
    j2k_dir = CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k"
    raw_dir = shared_ct("series/lungpetctdx_a0001_philips_upper_abdomen_kernelB")
    files = sorted(j2k_dir.glob("*.dcm"))
    assert len(files) == 10
    for f in files:
        j2k = pydicom.dcmread(f)
        raw = pydicom.dcmread(raw_dir / f.name)
        assert j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        assert raw.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        np.testing.assert_array_equal(dataset_to_hu(j2k), dataset_to_hu(raw), err_msg=f.name)


def test_j2k_signedness_mismatch_is_corrected():
    # Same coronal image: SIZ0 has a signed dataset with an unsigned codestream, SIZ1 the reverse.
    a = read_hu(shared_ct("slices/toshiba_j2k_pelvis_coronal_siz0.dcm"))[0]
    b = read_hu(shared_ct("slices/toshiba_j2k_pelvis_coronal_siz1.dcm"))[0]
    np.testing.assert_array_equal(a, b)
    assert a.min() == -2048 and np.median(a) < 0  # padding and soft tissue, not 16-bit noise


def test_enhanced_ct_frames_use_functional_groups():
    ds = pydicom.dcmread(CT_FIXTURES / "slices" / "enhanced_ct0012_2frames_rle.dcm")
    assert "RescaleIntercept" not in ds  # only in the Pixel Value Transformation Sequence
    raw = ds.pixel_array
    for frame in (0, 1):
        hu = dataset_to_hu(ds, frame)
        # IOP [-1,0,0,0,1,0]: columns run patient left -> right, so the display turn flips them.
        np.testing.assert_array_equal(hu, raw[frame][:, ::-1].astype(np.float32) - 1024)
    assert not np.array_equal(dataset_to_hu(ds, 0), dataset_to_hu(ds, 1))
    with pytest.raises(ValueError, match="frame 2 out of range"):
        dataset_to_hu(ds, 2)


@pytest.mark.parametrize("iop,expect", [
    ([1, 0, 0, 0, 1, 0], lambda a: a),  # supine, head first
    ([1, 0, 0, 0, -1, 0], lambda a: a[::-1, :]),  # rows stored posterior -> anterior
    ([-1, 0, 0, 0, -1, 0], lambda a: a[::-1, ::-1]),  # prone: upside down
    ([0, 1, 0, 1, 0, 0], lambda a: a.T),  # decubitus: rotated / transposed
    ([0, -1, 0, 1, 0, 0], lambda a: a.T[::-1, :]),  # columns run anterior: transpose, then flip rows
    ([0.98, 0.17, 0, -0.17, 0.98, 0], lambda a: a),  # 10 degrees oblique: nearest turn is none
])
def test_orientation_turns_the_image(iop, expect):
    ds = pydicom.dcmread(CT_FIXTURES / "slices" / "ctimage_deflated.dcm")
    ds.PixelSpacing = [0.5, 0.8]
    base = dataset_to_hu(ds)
    turned = copy.deepcopy(ds)
    turned.ImageOrientationPatient = iop
    np.testing.assert_array_equal(dataset_to_hu(turned), np.ascontiguousarray(expect(base)))
    transpose = display_turn(image_orientation(turned))[0]
    assert pixel_spacing_mm(turned) == ((0.8, 0.5) if transpose else (0.5, 0.8))


def test_real_flipped_orientation_comes_out_spine_down():
    # Pancreas-CT slice stored with IOP [1,0,0,0,-1,0]: rows run posterior -> anterior in the file.
    ds = pydicom.dcmread(shared_ct("slices/pancreasct_upper_abdomen_j2k.dcm"))
    assert [round(float(v)) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, -1, 0]
    stored = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
    hu = dataset_to_hu(ds)
    np.testing.assert_array_equal(hu, stored[::-1])
    body = hu > -300
    rows = np.nonzero(body.any(axis=1))[0]
    mid = (rows[0] + rows[-1]) / 2
    bone_rows = np.nonzero(hu > 400)[0]
    assert np.median(bone_rows) > mid, "the spine must be in the posterior (lower) half as DICOM displays it"


def test_slice_normal_of_the_tilted_series():
    ds = pydicom.dcmread(shared_ct("series/dcmqa_ge_head_tilt/09.dcm"), stop_before_pixels=True)
    n = slice_normal(ds)
    assert abs(np.linalg.norm(n) - 1) < 1e-9
    assert 18 < np.degrees(np.arccos(abs(n[2]))) < 19  # GantryDetectorTilt +18.5


def test_undecodable_data_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="ctimage_jpeg_progressive_55_retired.dcm.*transfer syntax"):
        read_hu(shared_ct("slices/ctimage_jpeg_progressive_55_retired.dcm"))
    bad = tmp_path / "truncated.dcm"
    data = (CT_FIXTURES / "slices" / "ctimage_jpeg_lossless_57.dcm").read_bytes()
    bad.write_bytes(data[: len(data) - 20000])
    with pytest.raises(ValueError, match="truncated.dcm"):
        read_hu(bad)
    with pytest.raises(ValueError, match="not a readable DICOM file"):
        read_hu(CT_FIXTURES / "labels.csv")
    ds = pydicom.dcmread(CT_FIXTURES / "slices" / "ctimage_deflated.dcm")
    ds.RescaleSlope = 0
    with pytest.raises(ValueError, match="RescaleSlope"):
        dataset_to_hu(ds)
