"""Model card: Markdown and JSON written from a real checkpoint and a real evaluation."""

from __future__ import annotations

import json

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
