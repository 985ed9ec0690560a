"""Whole-series evaluation (trainer.series_eval): NIfTI volumes as DICOM series through the node's pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dicomnode.classification.model import CLASSES, load_model, make_untrained_checkpoint
from tests.conftest import SHARED_DATA
from trainer.series_eval import score_series, summarize, write_dicom_series

VOLUMES = SHARED_DATA / "volumes" / "labels.csv"
needs_shared = pytest.mark.skipif(not VOLUMES.is_file(), reason="../shared/data not present")


def _sets(*labels):
    return [frozenset(x.split("|")) if x else None for x in labels]


def test_boundary_error_is_measured_against_the_labelled_zone():
    z = [30.0, 27.0, 24.0, 21.0, 18.0, 15.0, 12.0, 9.0]  # top -> bottom, 3 mm apart
    labels = _sets("neck", "neck", "neck", "lungs", "lungs", "lungs", "lungs", "lungs")
    exact = score_series(CLASSES, z, labels, ["neck"] * 3 + ["lungs"] * 5, ["neck"] * 3 + ["lungs"] * 5)
    (b,) = exact["boundaries"]
    assert b["boundary"] == "neck/lungs" and b["zone_width_mm"] == 0 and b["error_mm"] == 0
    assert exact["errors"] == 0 and exact["non_neighbour_errors"] == 0
    late = score_series(CLASSES, z, labels, ["neck"] * 5 + ["lungs"] * 3, ["neck"] * 5 + ["lungs"] * 3)
    assert late["boundaries"][0]["error_mm"] == pytest.approx(6.0) and late["errors"] == 2
    # Slices labelled with both classes form a zone: any boundary inside it is exact.
    zone = _sets("head", "head", "head|neck", "head|neck", "head|neck", "neck", "neck", None)
    dec = ["head"] * 4 + ["neck"] * 4
    rec = score_series(CLASSES, z, zone, dec, dec)
    assert rec["boundaries"][0]["zone_width_mm"] == pytest.approx(9.0) and rec["boundaries"][0]["error_mm"] == 0
    assert rec["scored"] == 7  # the unlabelled slice is classified but not scored
    # A region that never appears in the decoded path: the boundary is missed; a far confusion is counted.
    missed = score_series(CLASSES, z, labels, ["neck"] * 3 + ["legs"] * 5, ["neck"] * 3 + ["legs"] * 5)
    assert missed["boundaries"][0]["missed"] and missed["non_neighbour_errors"] == 5
    s = summarize([dict(exact, patient="a", source="x", ordered_top_down=True),
                   dict(late, patient="b", source="x", ordered_top_down=True)])
    assert s["boundary_error"]["median_mm"] == pytest.approx(3.0) and s["slice_errors"] == 2
    assert s["per_boundary"]["neck/lungs"]["n"] == 2 and s["per_source"]["x"]["patients"] == 2


@needs_shared
def test_written_series_is_the_volume_in_dicom_geometry(tmp_path):
    import nibabel as nib

    from dicomnode.classification.imaging.pixels import read_hu
    from dicomnode.classification.imaging.series import plan_series, read_headers

    src = SHARED_DATA / "volumes" / "totalseg" / "totalseg_example_ct_dicom.nii.gz"
    img = nib.load(str(src))
    vol = np.asarray(img.dataobj)
    paths = write_dicom_series(src, tmp_path)
    assert len(paths) == vol.shape[2]
    hu, spacing = read_hu(paths[3])
    assert np.array_equal(np.asarray(hu), vol[:, :, 3].T.astype(np.float32))
    zooms = img.header.get_zooms()
    assert spacing == pytest.approx((zooms[1], zooms[0]))
    headers = [h for p in paths for h in read_headers(p)]
    assert sorted(h.instance_number for h in headers) != [h.instance_number for h in headers]  # shuffled
    plan = plan_series(headers, 1)
    assert plan.in_scope and plan.order_source == "position"
    assert [h.path for h in plan.slices] == paths[::-1]  # top (highest k, superior) first


@needs_shared
def test_cli_evaluate_series_runs_the_node_pipeline(tmp_path, capsys):
    from dicomnode.cli import main

    ckpt = make_untrained_checkpoint(tmp_path / "m.pt")
    rc = main(["evaluate", "--model", str(ckpt), "--labels", str(VOLUMES), "--series", "--series-limit", "1",
               "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["failed"] == []
    (vol,) = out["volumes"]
    assert vol["order_source"] == "position" and vol["ordered_top_down"]
    assert vol["scored"] > 0 and vol["n_slices"] >= vol["scored"]
    assert out["summary"]["slices_scored"] == vol["scored"] and out["anchor"]["median_boundary_error_mm"] == 8.9
    assert load_model(ckpt).version == out["model_version"]


def test_cli_evaluate_series_without_volumes_is_a_clear_error(tmp_path, capsys):
    from dicomnode.cli import main
    from tests.conftest import CT_FIXTURES

    ckpt = make_untrained_checkpoint(tmp_path / "m.pt")
    rc = main(["evaluate", "--model", str(ckpt), "--labels", str(CT_FIXTURES / "labels.csv"), "--series",
               "--device", "cpu"])
    assert rc == 2 and "none of the labelled rows belongs to a NIfTI volume" in capsys.readouterr().err
