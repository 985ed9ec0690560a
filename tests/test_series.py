"""Grouping, scope and ordering of real CT series (dicomnode.classification.imaging.series)."""

from __future__ import annotations

import dataclasses
import random
import shutil

import pytest

from conftest import CT_FIXTURES, shared_ct
from dicomnode.classification.imaging.series import (
    SeriesError,
    group_series,
    plan_series,
    read_headers,
    scope_reason,
)



def headers_of(folder):
    return [h for f in sorted(folder.glob("*.dcm")) for h in read_headers(f)]


def test_tilted_series_with_spacing_change_is_ordered_by_position():
    headers = headers_of(shared_ct("series/dcmqa_ge_head_tilt"))
    rng = random.Random(3)
    # Shuffle the files and scramble InstanceNumber: the order must come from the geometry alone.
    numbers = list(range(len(headers)))
    rng.shuffle(numbers)
    scrambled = [dataclasses.replace(h, instance_number=n) for h, n in zip(headers, numbers)]
    rng.shuffle(scrambled)
    plan = plan_series(scrambled, min_slices=5)
    assert plan.in_scope and plan.order_source == "position"
    assert [h.path.name for h in plan.slices] == [f"{i:02d}.dcm" for i in range(20, 8, -1)]  # head first
    assert all(a > b for a, b in zip(plan.z_mm, plan.z_mm[1:]))
    gaps = [round(a - b, 2) for a, b in zip(plan.z_mm, plan.z_mm[1:])]
    assert min(gaps) < 1.3 and max(gaps) > 7  # the 1.14 mm step where 4 mm turns to 7.38 mm
    assert any("spacing varies" in n for n in plan.notes)


def test_instance_number_is_only_a_fallback():
    headers = headers_of(shared_ct("series/lungpetctdx_a0002_siemens_chest"))
    no_position = [dataclasses.replace(h, position=None) for h in reversed(headers)]
    plan = plan_series(no_position, min_slices=5)
    assert plan.order_source == "instance_number"
    assert [h.instance_number for h in plan.slices] == list(range(1, 31))
    assert any("instance number" in n for n in plan.notes)
    neither = [dataclasses.replace(h, instance_number=None) for h in no_position]
    assert plan_series(neither, min_slices=5).order_source == "file"


def test_feet_first_order_still_runs_head_to_feet():
    plan = plan_series(headers_of(shared_ct("series/lungpetctdx_a0002_siemens_chest"))[::-1], min_slices=5)
    assert plan.z_mm[0] == 312.0 and plan.z_mm[-1] == 80.0
    assert plan.slices[0].instance_number == 1


@pytest.mark.parametrize("rel,reason", [
    ("slices/barre_chest_scout_jpegll.dcm", "localizer/scout: ImageType ORIGINAL\\PRIMARY\\LOCALIZER"),
    ("slices/philips_j2k_lossy_scout.dcm", "LOCALIZER"),
])
def test_fixture_scouts_are_skipped(rel, reason):
    headers = read_headers(CT_FIXTURES / rel)
    assert reason in scope_reason(headers * 30, min_slices=5)  # even a long "series" of them


@pytest.mark.parametrize("rel,reason", [
    ("slices/philips_surview_localizer.dcm", "localizer/scout"),
    ("slices/toshiba_j2k_pelvis_coronal_siz0.dcm", "not axial: slice normal 90 degrees"),
    ("slices/barre_ankle_3d_rendering.dcm", "SOP class 1.2.840.10008.5.1.4.1.1.7 is not a CT image"),
    ("slices/ge_optima_lumbar_spine.dcm", "1 slice(s), fewer than worker.min_slices=5"),
])
def test_shared_out_of_scope_images_are_skipped_with_a_reason(rel, reason):
    plan = plan_series(read_headers(shared_ct(rel)), min_slices=5)
    assert not plan.in_scope
    assert reason in plan.skip_reason


def test_other_scope_rules():
    headers = headers_of(CT_FIXTURES / "series" / "dcmqi_ge_3slice")
    assert scope_reason(headers, 5) == "3 slice(s), fewer than worker.min_slices=5"
    assert scope_reason(headers, 3) == ""
    assert scope_reason([dataclasses.replace(h, modality="MR") for h in headers], 3) == "modality MR is not CT"
    tiny = [dataclasses.replace(h, rows=32, columns=32) for h in headers]
    assert "too small" in scope_reason(tiny, 3)
    tilted = headers_of(shared_ct("series/dcmqa_ge_head_tilt"))  # 18.5 degrees of gantry tilt is still axial
    assert scope_reason(tilted, 5) == ""
    assert scope_reason([], 1) == "series has no images"


def test_inconsistent_geometry_fails_with_a_reason():
    chest = headers_of(shared_ct("series/lungpetctdx_a0002_siemens_chest"))
    uid = chest[0].series_instance_uid
    small = read_headers(CT_FIXTURES / "slices" / "pydicom_ct_small.dcm")[0]
    with pytest.raises(SeriesError, match=r"mixed image sizes in one series: 512x512 \(30 slices\), 128x128 \(1"):
        plan_series(chest + [dataclasses.replace(small, series_instance_uid=uid)], 5)
    tilt = read_headers(shared_ct("series/dcmqa_ge_head_tilt/09.dcm"))[0]
    with pytest.raises(SeriesError, match="09.dcm .*ImageOrientationPatient"):
        plan_series(chest + [dataclasses.replace(tilt, series_instance_uid=uid)], 5)
    twin = dataclasses.replace(chest[4], sop_instance_uid=chest[4].sop_instance_uid + ".9")
    with pytest.raises(SeriesError, match="same position"):
        plan_series(chest + [twin], 5)


def test_group_series_reads_folders(tmp_path):
    shutil.copytree(CT_FIXTURES / "series", tmp_path / "in")
    # A second copy of one SOP instance and a non-DICOM file are reported, not fatal.
    shutil.copy(CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm", tmp_path / "in" / "copy.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    groups, problems = group_series([tmp_path / "in"])
    assert sorted(len(v) for v in groups.values()) == [3, 10]
    assert any("notes.txt: not a readable DICOM file" in p for p in problems)
    assert any("same SOPInstanceUID" in p for p in problems)
    with pytest.raises(ValueError, match="no such file or folder"):
        group_series([tmp_path / "missing"])


def test_multiframe_file_gives_one_slice_per_frame():
    headers = read_headers(CT_FIXTURES / "slices" / "enhanced_ct0012_2frames_rle.dcm")
    assert [h.frame for h in headers] == [0, 1]
    assert headers[0].position != headers[1].position
    assert headers[0].spacing_mm == pytest.approx((0.388672, 0.388672))
    plan = plan_series(headers, min_slices=1)
    assert plan.in_scope and len(plan.slices) == 2 and plan.order_source == "position"
