"""Evaluation: the paper's metrics on real rows and a real (tiny) model, a|b counting, the CLI's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dicomnode.cli import main
from dicomnode.classification.imaging.preprocess import preprocess_batch
from dicomnode.classification.model import CLASSES, load_model, make_untrained_checkpoint, predict_proba
from tests.conftest import CT_FIXTURES, SHARED_DATA
from tests.trainer_data import write_subset_labels
from trainer.datasets import load_image, read_labels
from trainer.evaluate import compute_metrics, evaluate, is_not_worse, row_classes, row_source

LABELS = CT_FIXTURES / "labels.csv"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_model(make_untrained_checkpoint(tmp_path_factory.mktemp("model") / "m", seed=1), device="cpu")


@pytest.fixture(scope="module")
def rows():
    return read_labels(LABELS)


def test_compute_metrics_counts_either_class_of_a_boundary_slice():
    classes = ("a", "b", "c")
    probs = np.array([
        [0.7, 0.2, 0.1],  # {a}: right
        [0.1, 0.8, 0.1],  # {a, b}: b is right too
        [0.6, 0.3, 0.1],  # {a, b}: a right
        [0.2, 0.1, 0.7],  # {a, b}: wrong (c)
        [0.5, 0.4, 0.1],  # {b}: wrong (a)
        [0.1, 0.2, 0.7],  # {c}: right
    ])
    sets = [{0}, {0, 1}, {0, 1}, {0, 1}, {1}, {2}]
    m = compute_metrics(probs, sets, classes, patients=["p1", "p1", "p2", "p2", "p3", "p3"])
    assert m["n"] == 6 and m["errors"] == 2
    assert m["error"] == pytest.approx(2 / 6)
    assert m["accuracy"] == {"a": pytest.approx(3 / 4), "b": pytest.approx(2 / 4), "c": 1.0}
    assert m["class_counts"] == {"a": 4, "b": 4, "c": 1}
    assert m["patients_per_class"] == {"a": 2, "b": 3, "c": 1}
    y_a = np.array([1, 1, 1, 1, 0, 0])
    assert m["auc"]["a"] == pytest.approx(roc_auc_score(y_a, probs[:, 0]))
    assert m["mean_auc"] == pytest.approx(np.mean(list(m["auc"].values())))
    conf = np.array(m["confusion"]["matrix"])
    assert m["confusion"]["classes"] == ["a", "b", "c"]
    # a|b predicted b -> counted as b on the diagonal; a|b predicted c -> true a (the upper one)
    assert conf.tolist() == [[2, 0, 1], [1, 1, 0], [0, 0, 1]]
    assert conf.sum() == 6


def test_compute_metrics_undefined_auc_and_bad_input():
    m = compute_metrics(np.array([[0.9, 0.1], [0.8, 0.2]]), [{0}, {0}], ("x", "y"))
    assert m["auc"] == {"x": None, "y": None} and m["mean_auc"] is None
    assert m["accuracy"]["y"] is None and m["error"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros((3, 2)), [{0}, {1}], ("x", "y"))
    with pytest.raises(ValueError, match="outside"):
        compute_metrics(np.zeros((1, 2)), [{2}], ("x", "y"))


def test_evaluate_real_rows_matches_the_model(tiny_model, rows):
    result = evaluate(tiny_model, rows)
    assert result["n"] == len(rows) == 19
    assert result["model_version"].startswith("untrained-test-model")
    # Recompute the predictions through the node's own pipeline, independently of evaluate().
    x = preprocess_batch([load_image(r) for r in rows], tiny_model.preprocess)
    pred = predict_proba(tiny_model, x).argmax(axis=1)
    wrong = sum(CLASSES[k] not in r.classes for k, r in zip(pred, rows))
    assert result["errors"] == wrong
    assert result["error"] == pytest.approx(wrong / len(rows))
    assert np.array(result["confusion"]["matrix"]).sum() == len(rows)
    assert set(result["per_source"]) == {"ct/series", "ct/slices"}
    assert sum(m["n"] for m in result["per_source"].values()) == len(rows)
    assert result["class_counts"]["lungs"] == sum("lungs" in r.classes for r in rows)
    assert result["patients_per_class"]["neck"] == len({r.patient for r in rows if "neck" in r.classes})
    assert result["unreadable"] == []


def test_row_helpers(rows):
    boundary = next(r for r in rows if r.region == "lungs|liver")
    assert row_classes(boundary, CLASSES) == {CLASSES.index("lungs"), CLASSES.index("liver")}
    assert row_source(boundary) == "ct/series"
    assert all(r.input_kind == "dicom" for r in rows)


def test_five_class_view_folds_head_into_neck_and_abdomen_into_its_neighbours():
    from dicomnode.classification.model import FIVE_CLASSES
    from trainer.evaluate import EvalOutputs, compute_metrics, five_class_view

    classes = ("head", "neck", "lungs", "liver", "abdomen", "pelvis", "legs")
    probs = np.array([[0.7, 0.2, 0.1, 0, 0, 0, 0],     # head slice called head: right in both views
                      [0.6, 0.1, 0.3, 0, 0, 0, 0],     # neck slice called head: wrong, right once folded
                      [0, 0, 0, 0.2, 0.7, 0.1, 0],     # abdomen slice called abdomen
                      [0, 0, 0, 0.1, 0.1, 0.8, 0]])    # pelvis slice called pelvis
    sets = [frozenset({0}), frozenset({1}), frozenset({4}), frozenset({5})]
    out = EvalOutputs(classes=classes, probs=probs, label_sets=sets, sources=["s"] * 4, patients=list("abcd"))
    assert compute_metrics(out.probs, out.label_sets, classes)["errors"] == 1
    view = five_class_view(out)
    assert view.classes == FIVE_CLASSES
    assert np.allclose(view.probs.sum(1), 1.0)
    assert np.allclose(view.probs[0], [0.9, 0.1, 0, 0, 0]) and np.allclose(view.probs[2], [0, 0, 0.55, 0.45, 0])
    assert view.label_sets == [{0}, {0}, {2, 3}, {3}]
    assert compute_metrics(view.probs, view.label_sets, FIVE_CLASSES)["errors"] == 0
    assert five_class_view(view) is view


def test_a_five_class_model_reads_head_rows_as_neck():
    from dicomnode.classification.model import FIVE_CLASSES

    head = type("Row", (), {"classes": ("head",), "labels_file": None, "line": 1})()
    assert row_classes(head, FIVE_CLASSES) == {FIVE_CLASSES.index("neck")}


def test_is_not_worse():
    base = {"n": 10, "error": 0.2, "mean_auc": 0.9}
    assert is_not_worse({"n": 10, "error": 0.2, "mean_auc": 0.9}, base)
    assert is_not_worse({"n": 10, "error": 0.1, "mean_auc": 0.95}, base)
    assert not is_not_worse({"n": 10, "error": 0.3, "mean_auc": 0.95}, base)
    assert not is_not_worse({"n": 10, "error": 0.2, "mean_auc": 0.85}, base)
    assert is_not_worse({"n": 10, "error": 0.21, "mean_auc": 0.9}, base, tolerance=0.02)
    with pytest.raises(ValueError, match="different sets"):
        is_not_worse({"n": 9, "error": 0.2, "mean_auc": 0.9}, base)


def test_cli_evaluate_json_and_figures(tmp_path, capsys):
    model = make_untrained_checkpoint(tmp_path / "m", seed=2)
    figs = tmp_path / "figs"
    rc = main(["evaluate", "--model", str(model.parent), "--labels", str(LABELS), "--json", "--figures", str(figs)])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    for key in ("n", "error", "accuracy", "auc", "mean_auc", "confusion", "per_source", "class_counts",
                "patients_per_class", "model_version"):
        assert key in data, key
    assert data["n"] == 19
    assert set(data["accuracy"]) == set(CLASSES) and set(data["auc"]) == set(CLASSES)
    assert data["confusion"]["classes"] == list(CLASSES)
    for name in ("confusion", "roc", "filters", "tsne", "tps"):
        assert (figs / data["figures"][name].split("/")[-1]).read_bytes()[:4] == b"\x89PNG"


def test_cli_evaluate_reports_bad_input(tmp_path, capsys):
    model = make_untrained_checkpoint(tmp_path / "m", seed=3)
    # A labels file naming a missing file and an unknown region: refused with file:line.
    bad = tmp_path / "bad.csv"
    bad.write_text("path,patient,region\nnope.dcm,p1,lungs\nslice.dcm,p2,stomach\n")
    (tmp_path / "slice.dcm").write_bytes(b"not dicom")
    rc = main(["evaluate", "--model", str(model), "--labels", str(bad), "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:2" in err and "file not found" in err
    assert f"{bad}:3" in err and "stomach" in err
    # A file that exists but is not an image: listed as unreadable, exit 1, the rest evaluated.
    mixed = tmp_path / "mixed.csv"
    good = CT_FIXTURES / "slices" / "pydicom_ct_small.dcm"
    mixed.write_text(f"path,patient,region\n{good},p1,lungs\nslice.dcm,p2,liver\n")
    rc = main(["evaluate", "--model", str(model), "--labels", str(mixed), "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    assert json.loads(captured.out)["n"] == 1
    assert f"{mixed}:3" in captured.err
    # A model path that is not there.
    rc = main(["evaluate", "--model", str(tmp_path / "missing"), "--labels", str(LABELS)])
    assert rc == 2 and "not found" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_DATA / "openkbp" / "labels.csv").is_file(), reason="../shared/data not present")
def test_cli_evaluate_on_the_models_own_validation_split(tmp_path, capsys):
    from trainer.train import TrainSettings, train

    labels = write_subset_labels(tmp_path / "labels.csv", per_class=4)
    report = train(TrainSettings(labels=[str(labels)], out=str(tmp_path / "run"), dry_run=True, dry_run_batches=1,
                                 per_class=8, batch_size=16, val_fraction=0.5, progress=False, threads=1,
                                 net_config={"widths": [4, 8, 8, 8, 8], "kernels": [3, 3, 3, 3, 3], "fc": [16]},
                                 preprocess={"size": 64, "pixel_mm": 6.4}))
    val = report["data"]["validation"]
    rc = main(["evaluate", "--model", str(tmp_path / "run"), "--split", "validation", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["split"] == "validation"
    assert data["n"] == val["slices"] and data["patients"] == val["patients"]
    assert data["class_counts"] == val["class_counts"]
    rc = main(["evaluate", "--model", str(tmp_path / "run"), "--split", "train", "--json"])
    train_data = json.loads(capsys.readouterr().out)
    assert train_data["n"] + data["n"] == len(read_labels(labels))
    # The same labels without the training patients are exactly the validation split.
    rc = main(["evaluate", "--model", str(tmp_path / "run"), "--labels", str(labels), "--exclude-training-patients",
               "--json"])
    unseen = json.loads(capsys.readouterr().out)
    assert rc == 0 and unseen["n"] == data["n"] and unseen["excluded_training_patient_slices"] == train_data["n"]
    # Other labels than the model was trained on: the rebuilt split does not match and is refused.
    rc = main(["evaluate", "--model", str(tmp_path / "run"), "--split", "validation", "--labels", str(LABELS)])
    assert rc == 2 and "same --labels" in capsys.readouterr().err
    # An untrained test model has no training record.
    rc = main(["evaluate", "--model", str(make_untrained_checkpoint(tmp_path / "u")), "--split", "validation"])
    assert rc == 2 and "no training record" in capsys.readouterr().err
    rc = main(["evaluate", "--model", str(tmp_path / "run")])
    assert rc == 2 and "--labels is required" in capsys.readouterr().err
