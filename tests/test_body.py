"""The body mask of a resampled slice (dicomnode.classification.imaging.body): the table goes, the body,
its arms and its lungs stay; on real slices with and without a table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from conftest import SHARED_DATA, shared_ct
from dicomnode.classification.imaging.body import body_mask, clear_outside_body
from dicomnode.classification.imaging.pixels import read_hu
from dicomnode.classification.imaging.preprocess import PreprocessParams, preprocess_slice, resample_hu

AIR, FAT, LUNG, BONE = -1000.0, -100.0, -850.0, 700.0


def _disc(shape, centre, radius):
    r, c = np.ogrid[:shape[0], :shape[1]]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius ** 2


def _chest_on_a_table() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 128 x 128 slice at 3.2 mm: a torso with two lungs, two arms beside it, a curved 1-pixel table
    shell and a solid 3-pixel table top below."""
    hu = np.full((128, 128), AIR, dtype=np.float32)
    parts = {"torso": _disc(hu.shape, (60, 64), 34), "left arm": _disc(hu.shape, (60, 14), 8),
             "right arm": _disc(hu.shape, (60, 114), 8)}
    for part in parts.values():
        hu[part] = FAT
    parts["lungs"] = _disc(hu.shape, (55, 50), 10) | _disc(hu.shape, (55, 78), 10)
    hu[parts["lungs"]] = LUNG
    cols = np.arange(20, 108)
    shell = np.zeros_like(hu, dtype=bool)
    shell[(100 + ((cols - 64) / 20.0) ** 2).astype(int).clip(0, 127), cols] = True  # a bent line, 1 px thick
    parts["shell"] = shell
    top = np.zeros_like(shell)
    top[110:113, 10:118] = True  # solid, 3 px (~10 mm) high, 108 px wide
    parts["top"] = top
    hu[shell | top] = BONE
    return hu, parts


def test_the_table_goes_and_the_body_its_arms_and_lungs_stay():
    hu, parts = _chest_on_a_table()
    mask = body_mask(hu, -150.0, 3.2)
    assert mask is not None
    for name in ("torso", "left arm", "right arm", "lungs"):
        assert mask[parts[name]].all(), f"{name} lost"
    assert not mask[parts["shell"]].any() and not mask[parts["top"]].any()
    cleared = clear_outside_body(hu.copy(), -150.0, 3.2, -1024.0)
    assert (cleared[parts["lungs"]] == LUNG).all()  # the lungs keep their HU
    assert (cleared[parts["shell"] | parts["top"]] == -1024.0).all()


def test_a_slice_with_nothing_thick_enough_is_left_as_it_is():
    hu = np.full((64, 64), AIR, dtype=np.float32)
    hu[30, 5:60] = BONE  # a 1-pixel line only
    assert body_mask(hu, -150.0, 3.2) is None
    assert np.array_equal(clear_outside_body(hu.copy(), -150.0, 3.2, -1024.0), hu)


def test_two_legs_both_stay_and_a_small_speck_goes():
    hu = np.full((128, 128), AIR, dtype=np.float32)
    left, right, speck = _disc(hu.shape, (64, 40), 18), _disc(hu.shape, (64, 88), 16), _disc(hu.shape, (110, 64), 2)
    hu[left | right | speck] = FAT
    mask = body_mask(hu, -150.0, 3.2)
    assert mask[left].all() and mask[right].all() and not mask[speck].any()


def test_the_pet_table_under_a_real_neck_slice_is_cleared():
    """Philips PET/CT at shoulder level (ct/, labelled neck): rows 98-127 of the resampled slice hold only
    the curved table; it goes, and the shoulders and arms above it keep their pixels."""
    hu, spacing = read_hu(shared_ct("series/lungpetctdx_a0001_philips_neck_chest/1-07.dcm"))
    before = resample_hu(hu, spacing, PreprocessParams(clear_outside_body=False))
    after = resample_hu(hu, spacing, PreprocessParams())
    assert (before[98:] > -150).sum() > 50  # the table is there without the clearing
    assert not (after[98:] > -150).any()
    body = before[:90] > -150
    kept = after[:90][body] == before[:90][body]
    assert kept.mean() > 0.98  # what goes above row 90 is the table's rim curving up at the sides


@pytest.mark.skipif(not (SHARED_DATA / "openkbp" / "labels.csv").is_file(), reason="../shared/data not present")
def test_slices_whose_outside_is_already_air_keep_their_body():
    """OpenKBP sets everything outside the body to air: clearing keeps the head, neck and lung slices'
    body (shoulders, arms and lungs included); what it changes (the partial-volume rim outside the mask,
    a few specks) becomes air."""
    from trainer import datasets as ds

    rows = [r for r in ds.read_labels(SHARED_DATA / "openkbp" / "labels.csv") if r.classes[0] in ("neck", "lungs")]
    rows = rows[:: max(1, len(rows) // 24)][:24]
    on = PreprocessParams()
    plain, _ = ds.load_resampled(rows, PreprocessParams(clear_outside_body=False))
    for row, x in zip(rows, plain):
        x = x.astype(np.float32)
        y = clear_outside_body(x.copy(), on.body_threshold_hu, on.pixel_mm, on.pad_hu)
        body = x > on.body_threshold_hu
        assert (y[body] == x[body]).mean() > 0.99, row.where
        assert (y[y != x] == on.pad_hu).all(), row.where
        if row.classes == ("lungs",):  # the lungs are holes of the body: kept (pixels 3+ from outside air)
            lung = (x > -950) & (x < -500) & ndimage.binary_erosion(x > -1000, iterations=3)
            assert lung.sum() > 100 and (y[lung] == x[lung]).mean() > 0.95, row.where


def test_params_default_on_and_old_checkpoints_read_as_trained():
    assert PreprocessParams().clear_outside_body is True
    old = PreprocessParams().to_dict()
    del old["clear_outside_body"]  # a checkpoint from before the key
    assert PreprocessParams.from_dict(old).clear_outside_body is False
    assert PreprocessParams.from_dict(PreprocessParams().to_dict()).clear_outside_body is True
    hu, _ = _chest_on_a_table()
    fixed = {"centre_body": False}  # the same crop with and without the table
    with_table = preprocess_slice(hu, (3.2, 3.2), PreprocessParams(clear_outside_body=False, **fixed))
    without = preprocess_slice(hu, (3.2, 3.2), PreprocessParams(**fixed))
    assert with_table[0][110:113].max() == 1.0 and without[0][110:113].max() == 0.0


def test_the_separable_opening_equals_scipys_3x3_erosion_and_dilation():
    """_erode / _dilate (1 x 3 then 3 x 1) against scipy's 3 x 3 square, outside the image background."""
    from dicomnode.classification.imaging.body import _dilate, _erode

    square = np.ones((3, 3), dtype=bool)
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = (int(rng.integers(3, 40)), int(rng.integers(3, 40)))
        mask = rng.random(shape) < rng.random()
        assert np.array_equal(_erode(mask), ndimage.binary_erosion(mask, square, border_value=0))
        assert np.array_equal(_dilate(mask), ndimage.binary_dilation(mask, square))
