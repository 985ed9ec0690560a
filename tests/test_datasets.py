"""labels.csv readers on the real CT of ../shared/data: DICOM, NIfTI, PNG/JPEG; bad files by path and line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dicomnode.classification.imaging.preprocess import PreprocessParams
from trainer import datasets as ds
from tests.conftest import CT_FIXTURES, SHARED_DATA

HEADER = ["path", "slice_index", "patient", "series", "sop_instance_uid", "z_mm", "region", "source",
          "label_method", "note"]

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "extra" / "labels.csv").exists(),
                                  reason="../shared/data not available")


def write_labels(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HEADER)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in HEADER})
    return path


@pytest.fixture(scope="module")
def extra_rows() -> list[ds.LabelRow]:
    if not (SHARED_DATA / "extra" / "labels.csv").exists():
        pytest.skip("../shared/data not available")
    return ds.read_labels(SHARED_DATA / "extra" / "labels.csv")


def _spine_below_body_centre(hu: np.ndarray) -> bool:
    """Displayed like DICOM shows a supine patient: the vertebra (bone) lies posterior = lower rows."""
    body = np.nonzero(hu > -150)
    bone = np.nonzero(hu > 250)
    return bone[0].mean() > body[0].mean()


def test_fixture_dicom_rows_and_boundary_regions():
    rows = ds.read_labels(CT_FIXTURES / "labels.csv")
    assert rows and all(r.kind == "dicom" for r in rows)
    boundary = [r for r in rows if r.region == "lungs|liver"]
    assert boundary and boundary[0].classes == ("lungs", "liver")
    assert all(r.region not in ("other", "exclude") for r in rows)
    everything = ds.read_labels(CT_FIXTURES / "labels.csv", include_outside=True)
    assert len(everything) > len(rows)
    hu, spacing = ds.load_image(boundary[0])
    assert hu.dtype == np.float32 and hu.ndim == 2 and spacing is not None
    assert -1100 < float(np.median(hu)) < 100  # HU, not raw stored values
    assert _spine_below_body_centre(hu)


@needs_shared
def test_nifti_volume_slice_in_display_orientation():
    rows = [r for r in ds.read_labels(SHARED_DATA / "volumes" / "labels.csv") if r.classes == ("liver",)]
    hu, spacing = ds.load_image(rows[len(rows) // 2])
    assert spacing is not None and all(1.0 <= s <= 4.0 for s in spacing)
    assert _spine_below_body_centre(hu)
    # the liver (large ~40-200 HU organ) lies on the patient's right = the image's left half
    liver_like = (hu > 40) & (hu < 200)
    left, right = liver_like[:, : hu.shape[1] // 2].sum(), liver_like[:, hu.shape[1] // 2:].sum()
    assert left > right


@needs_shared
def test_openkbp_nifti_and_boundary_with_other():
    rows = ds.read_labels(SHARED_DATA / "openkbp" / "labels.csv")
    assert {r.kind for r in rows} == {"nifti"} and all(r.slice_index is not None for r in rows)
    assert all("other" not in r.classes for r in rows)
    # The documented mapping (trainer.datasets.REGION_MAPPINGS): openkbp's brainstem-level `other` is head,
    # its jaw-level `other|neck` head|neck.
    assert any(r.region == "head|neck" and r.classes == ("head", "neck") and r.label_method.startswith(
        "mask:brainstem+") for r in rows)
    heads = [r for r in rows if r.classes == ("head",)]
    assert heads and all(r.label_method == "mask:brainstem" for r in heads)
    assert len({r.patient for r in heads}) == 80
    r = next(r for r in rows if r.classes == ("lungs",))
    hu, spacing = ds.load_image(r)
    assert spacing is not None and spacing[0] > 3.0  # the coarse 128-grid of OpenKBP
    assert hu.min() < -900 and hu.max() > 300


@needs_shared
def test_png_and_jpeg_encodings(extra_rows):
    by_kind = {}
    for r in extra_rows:
        by_kind.setdefault(r.subgroup, r)
    png8 = by_kind["extra/png8/deeplesion_ssbr"]
    png16 = by_kind["extra/png16/deeplesion_ragram88"]
    jpg8 = by_kind["extra/jpg8/deeplesion_ozymandias77"]
    sts = by_kind["extra/nifti/ibsi_sts"]
    hu8, sp8 = ds.load_image(png8)
    assert sp8 is None and png8.encoding.clipped_to == (-175.0, 275.0)
    # soft-tissue window: nothing above 275 HU; the clipped low end is read as air
    assert hu8.max() <= 275.0 + 1e-3 and set(np.unique(hu8[hu8 < -175])) <= {-1000.0}
    hu16, sp16 = ds.load_image(png16)
    assert sp16 is None and hu16.min() <= -1000 and hu16.max() > 300  # full HU: air and bone
    hj, _ = ds.load_image(jpg8)
    assert -1100 <= hj.min() and hj.max() <= 3072
    hs, sps = ds.load_image(sts)
    assert sps is not None and abs(sps[0] - 0.977) < 0.01
    assert all(p is None for p in ds.load_resampled([png8, png16, jpg8, sts], PreprocessParams(size=64))[1])


def test_pixel_encodings_parse(tmp_path):
    (tmp_path / "pixel_encodings.csv").write_text(
        "folder,format,hu_from_value,hu_low,hu_high,note\n"
        "a,8-bit PNG,hu = -175 + v * 450 / 255,-175,275,soft-tissue window: clipped\n"
        "b,16-bit PNG,hu = v - 32768,,,\n"
        "c,NIfTI,hu = v,,,\n"
        "d,odd,hu = log(v),,,\n")
    with pytest.raises(ds.LabelsError, match=r"pixel_encodings.csv:5: cannot read hu_from_value"):
        ds.read_pixel_encodings(tmp_path / "pixel_encodings.csv")
    (tmp_path / "pixel_encodings.csv").write_text(
        "folder,format,hu_from_value,hu_low,hu_high,note\n"
        "a,8-bit PNG,hu = -175 + v * 450 / 255,-175,275,soft-tissue window: clipped\n"
        "b,16-bit PNG,hu = v - 32768,,,\n")
    enc = ds.read_pixel_encodings(tmp_path / "pixel_encodings.csv")
    assert enc["a"].to_hu(np.array([0, 255, 128])).tolist() == pytest.approx([-1000.0, 275.0, -175 + 128 * 450 / 255])
    assert enc["b"].to_hu(np.array([32768, 30000])).tolist() == [0.0, -2768.0]


def test_bad_labels_name_path_and_line(tmp_path):
    dcm = (CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm").resolve()
    lf = write_labels(tmp_path / "set", [
        {"path": str(dcm), "patient": "p1", "region": "liver"},
        {"path": str(dcm), "patient": "p1", "region": "spleen"},
        {"path": "missing.dcm", "patient": "p2", "region": "lungs"},
        {"path": "vol.nii.gz", "patient": "p3", "region": "neck"},
        {"path": str(dcm), "patient": "", "region": "neck"},
        {"path": str(dcm), "slice_index": "x", "patient": "p4", "region": "neck"},
        {"path": "img.png", "patient": "p5", "region": "legs"},
        {"path": str(dcm), "patient": "p6", "region": "other"},
    ])
    (tmp_path / "set" / "img.png").write_bytes(b"")
    with pytest.raises(ds.LabelsError) as exc:
        ds.read_labels(lf)
    msgs = exc.value.problems
    text = "\n".join(msgs)
    assert f"{lf}:3: unknown region 'spleen'" in text
    assert f"{lf}:4: file not found" in text
    assert f"{lf}:5: NIfTI volume vol.nii.gz needs a slice_index" in text
    assert f"{lf}:6: empty patient" in text
    assert f"{lf}:7: slice_index 'x'" in text
    assert f"{lf}:8: no pixel encoding" in text
    assert len(msgs) == 6  # line 2 is fine, line 9 (other) is left out


def test_missing_column_and_missing_file(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("file,patient\nx.dcm,p\n")
    with pytest.raises(ds.LabelsError, match=r"labels.csv:1: missing column"):
        ds.read_labels(p)
    with pytest.raises(ds.LabelsError, match="labels file not found"):
        ds.read_labels(tmp_path / "none.csv")


def test_unreadable_image_reported_by_line(tmp_path):
    bad = tmp_path / "set" / "broken.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"DICM but not really" * 10)
    lf = write_labels(tmp_path / "set", [{"path": "broken.dcm", "patient": "p", "region": "liver"}])
    rows = ds.read_labels(lf)
    hu, problems = ds.load_resampled(rows, PreprocessParams(size=32, pixel_mm=12.8))
    assert len(problems) == 1 and problems[0].startswith(f"{lf}:2: cannot read")
    assert "broken.dcm" in problems[0]


def test_empty_class_is_an_error():
    rows = ds.read_labels(CT_FIXTURES / "labels.csv")
    with pytest.raises(ds.LabelsError, match="class 'pelvis' has no slice"):
        ds.check_classes(rows)


@needs_shared
def test_patient_split_is_deterministic_and_disjoint(extra_rows):
    a_train, a_val = ds.split_by_patient(extra_rows, 0.2, seed=1)
    b_train, b_val = ds.split_by_patient(extra_rows, 0.2, seed=1)
    assert [r.where for r in a_val] == [r.where for r in b_val]
    assert not {r.patient for r in a_train} & {r.patient for r in a_val}
    assert len(a_train) + len(a_val) == len(extra_rows)
    n_pat = len({r.patient for r in extra_rows})
    assert 0.1 * n_pat < len({r.patient for r in a_val}) < 0.3 * n_pat
    # every class is represented on both sides
    assert all(ds.class_counts(a_val)[c] > 0 for c in ("lungs", "liver", "pelvis", "legs"))
    _, c_val = ds.split_by_patient(extra_rows, 0.2, seed=2)
    assert {r.patient for r in c_val} != {r.patient for r in a_val}
    s = ds.summary(extra_rows)
    assert s["patients_per_class"]["legs"] >= 30 and s["class_counts"]["legs"] == ds.class_counts(extra_rows)["legs"]
