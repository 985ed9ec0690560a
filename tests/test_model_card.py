"""Model card: Markdown and JSON written from a real checkpoint and a real evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomnode.classification.model import load_model, make_untrained_checkpoint
from tests.conftest import CT_FIXTURES
from trainer.datasets import read_labels
from trainer.evaluate import evaluate
from trainer.model_card import build_card, main, write_model_card


def test_card_from_a_real_evaluation(tmp_path):
    ckpt = make_untrained_checkpoint(tmp_path / "m", seed=5)
    model = load_model(ckpt, device="cpu")
    metrics = evaluate(model, read_labels(CT_FIXTURES / "labels.csv"))
    card = build_card(model, {"ct fixtures": metrics},
                      comparison=[{"training": "augmented", "set": "ct", "n": metrics["n"],
                                   "error": metrics["error"], "mean_auc": metrics["mean_auc"]}])
    md, js = write_model_card(tmp_path / "card", card)
    data = json.loads(js.read_text())
    assert data["version"] == "untrained-test-model-seed5"
    assert data["evaluations"]["ct fixtures"]["error"] == metrics["error"]
    assert data["architecture"]["parameters"] > 0
    text = md.read_text()
    assert "untrained-test-model-seed5" in text
    assert f"error **{metrics['error']:.4f}**" in text
    assert "| ct/series |" in text and "| true \\ predicted |" in text
    assert "With and without augmentation" in text
    limits = " ".join(data["limits"]).lower()
    for word in ("legs", "pelvis", "8-bit", "crop"):
        assert word in limits


def test_card_cli_and_bad_card(tmp_path, capsys):
    ckpt = make_untrained_checkpoint(tmp_path / "m", seed=6)
    model = load_model(ckpt, device="cpu")
    metrics = evaluate(model, read_labels(CT_FIXTURES / "labels.csv"))
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps(metrics))
    assert main(["--model", str(ckpt), "--evaluation", f"fixtures={ev}", "--compare", f"no augmentation|fixtures={ev}",
                 "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "MODEL_CARD.json").read_text())
    assert data["augmentation_comparison"][0]["training"] == "no augmentation"
    assert data["augmentation_comparison"][0]["n"] == 19
    with pytest.raises(ValueError, match="version"):
        write_model_card(tmp_path / "bad", {"name": "x", "classes": []})


def test_card_shows_input_kinds_five_class_view_cross_source_and_series(tmp_path, capsys):
    ckpt = make_untrained_checkpoint(tmp_path / "m", seed=8)
    model = load_model(ckpt, device="cpu")
    metrics = evaluate(model, read_labels(CT_FIXTURES / "labels.csv"))
    assert set(metrics["per_input_kind"]) == {"dicom"} and metrics["five_class"]["folded"] == {"head": ["neck"]}
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps(metrics))
    series = {"summary": {"volumes": 1, "patients": 1, "slices_scored": 10, "slice_error": 0.1,
                          "non_neighbour_errors": 0, "boundaries": 1, "missed_boundaries": 0,
                          "boundary_error": {"median_mm": 3.0, "p90_mm": 3.0, "max_mm": 3.0},
                          "per_source": {}, "per_boundary": {"neck/lungs": {"n": 1, "missed": 0, "median_mm": 3.0,
                                                                             "p90_mm": 3.0, "max_mm": 3.0,
                                                                             "median_zone_width_mm": 0.0}}},
              "anchor": {"median_boundary_error_mm": 8.9, "reference": "Ouyang et al. 2022, CT"},
              "volumes": [{"path": "x"}]}
    sj = tmp_path / "series.json"
    sj.write_text(json.dumps(series))
    rc = main(["--model", str(ckpt), "--out", str(tmp_path / "card"), "--evaluation", f"ct={ev}",
               "--cross-source", f"ct/|ct/ DICOM|ct/series={ev}",
               "--cross-source", "openkbp/|head slices|=not possible: the only source of head slices",
               "--series-evaluation", f"val={sj}"])
    assert rc == 0
    text = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert "Per input kind" in text and "| dicom |" in text and "Five-class view" in text
    assert "## Cross-source evaluation" in text and "| ct/ | ct/ DICOM |" in text
    assert "not possible: the only source of head slices" in text
    assert "## Whole-series evaluation: val" in text and "| neck/lungs | 1 | 0 | 3.0 |" in text
    data = json.loads((tmp_path / "card" / "MODEL_CARD.json").read_text())
    assert "volumes" not in data["series_evaluations"]["val"]  # the card keeps the summary only
    assert data["cross_source"][0]["n"] == metrics["per_source"]["ct/series"]["n"]
    # a later card keeps the earlier rows it does not measure again, and replaces the ones it does
    old_card = tmp_path / "card" / "MODEL_CARD.json"
    rc = main(["--model", str(ckpt), "--out", str(tmp_path / "card2"), "--evaluation", f"ct={ev}",
               "--cross-source", f"ct/|ct/ DICOM again|={ev}", "--cross-source-from", str(old_card)])
    assert rc == 0
    rows = json.loads((tmp_path / "card2" / "MODEL_CARD.json").read_text())["cross_source"]
    assert [(r["trained_without"], r["tested_on"]) for r in rows] == [("ct/", "ct/ DICOM again"),
                                                                      ("openkbp/", "head slices")]
    assert rows[0]["n"] == metrics["n"]
    with pytest.raises(SystemExit):
        main(["--model", str(ckpt), "--out", str(tmp_path / "card3"), "--cross-source-from", str(tmp_path / "no")])


def test_the_shipped_card_describes_the_shipped_model():
    """A new default model must come with its own card: the card's version and preprocessing are those
    of the checkpoint beside it, and every evaluation it shows measured that version."""
    import dicomnode.classification.model as model_pkg
    from dicomnode.classification.model.files import read_checkpoint_header

    folder = Path(model_pkg.__file__).parent / "default"
    header = read_checkpoint_header(None)  # the shipped model
    card = json.loads((folder / "MODEL_CARD.json").read_text())
    assert card["version"] == header["version"]
    assert card["preprocessing"] == header["preprocess"]
    for name, evaluation in card["evaluations"].items():
        assert evaluation["model_version"] == header["version"], name
    for name, evaluation in card["series_evaluations"].items():
        assert evaluation["model_version"] == header["version"], name
    assert f"`{header['version']}`" in (folder / "MODEL_CARD.md").read_text()
