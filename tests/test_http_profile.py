"""dicomnode.http.profile: the coronal reformat of stored slices (sampled for long series) and the picture of
``classify --plot`` drawn once per classification from index-shaped results."""

from __future__ import annotations

from conftest import CT_FIXTURES
from dicomnode.http import profile

SERIES = sorted((CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k").glob("*.dcm"))


def _detail(n: int, classified_at: str) -> dict:
    probs = [{"neck": 0.0, "lungs": 1.0 - i / n, "liver": i / n, "pelvis": 0.0, "legs": 0.0} for i in range(n)]
    return {
        "series_instance_uid": "1.2.826.0.1.3680043.2.1125.1", "model_version": "m1", "classified_at": classified_at,
        "slices": [{"position": i, "sop_instance_uid": f"1.2.3.{i}", "instance_number": i + 1, "z_mm": -5.0 * i,
                    "probabilities": p, "predicted": max(p, key=p.get), "body_parts": []} for i, p in enumerate(probs)],
        "regions": [{"region": "lungs", "body_part": "LUNG", "first_position": 0, "last_position": n // 2,
                     "first_instance": 1, "last_instance": n // 2 + 1, "first_sop_instance_uid": "1.2.3.0",
                     "last_sop_instance_uid": f"1.2.3.{n // 2}", "z_start_mm": 0.0, "z_end_mm": -5.0 * (n // 2),
                     "n_slices": n // 2 + 1, "mean_probability": 0.8}],
    }


def test_coronal_reformat_samples_long_series_and_survives_a_bad_file(tmp_path):
    assert len(SERIES) >= 4
    assert profile.coronal_reformat(SERIES).shape == (len(SERIES), 256)
    assert profile.coronal_reformat(SERIES, max_rows=3).shape == (3, 256)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM")
    assert profile.coronal_reformat([*SERIES[:2], broken]) is None  # drawn without it, logged


def test_profile_is_drawn_once_per_classification(tmp_path):
    from PIL import Image

    detail = _detail(len(SERIES), "2026-12-02T05:00:00Z")
    first = profile.profile_png(detail, SERIES, tmp_path)
    assert Image.open(first).size == (1000, 700)
    stamp = first.stat().st_mtime_ns
    assert profile.profile_png(detail, SERIES, tmp_path) == first and first.stat().st_mtime_ns == stamp
    again = profile.profile_png(_detail(len(SERIES), "2026-12-02T06:00:00Z"), SERIES, tmp_path)  # re-classified
    assert again != first and again.is_file() and not first.exists()  # the earlier picture is gone
