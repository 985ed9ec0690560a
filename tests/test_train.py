"""``dicomnode train`` end to end on a tiny real subset: dry run, refusal of broken sets, resume, seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dicomnode.cli import main
from dicomnode.classification.model import CLASSES, load_model, predict_proba
from trainer import datasets as ds
from trainer.train import STATE_NAME, TrainSettings, train
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "extra" / "labels.csv").exists(),
                                reason="../shared/data not available")

TINY_NET = json.dumps({"widths": [4, 8, 8, 8, 8], "kernels": [3, 3, 3, 3, 3], "fc": [16]})
TINY_PRE = json.dumps({"size": 64, "pixel_mm": 6.4})
HEADER = ["path", "slice_index", "patient", "series", "sop_instance_uid", "z_mm", "region", "source",
          "label_method", "note"]


@pytest.fixture(scope="module")
def tiny_labels(tmp_path_factory) -> Path:
    """A labels file of real slices: 3 patients per class, 2 slices each, from every source folder."""
    rows: list[ds.LabelRow] = []
    for name in ("ct", "openkbp", "volumes", "extra"):
        rows += [r for r in ds.read_labels(SHARED_DATA / name / "labels.csv") if "retired" not in r.path.name]
    chosen: list[ds.LabelRow] = []
    for cls in CLASSES:
        patients: dict[str, list[ds.LabelRow]] = {}
        for r in rows:
            if r.classes[0] == cls and (len(patients) < 3 or r.patient in patients):
                patients.setdefault(r.patient, []).append(r)
        for rs in patients.values():
            chosen += rs[:2]
    folder = tmp_path_factory.mktemp("tiny")
    path = folder / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for r in chosen:
            # mirror the source layout with symlinks, so paths stay relative to the labels file
            rel = Path(r.group) / r.path.relative_to(r.labels_file.parent)
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (folder / rel).exists():
                (folder / rel).symlink_to(r.path)
            w.writerow([rel.as_posix(), "" if r.slice_index is None else r.slice_index, r.patient, r.series, "",
                        "", r.region, r.source, r.label_method, ""])
    # PNG/JPEG rows need their encodings beside the labels file (folders now under extra/)
    enc = (SHARED_DATA / "extra" / "pixel_encodings.csv").read_text().splitlines()
    (folder / "pixel_encodings.csv").write_text("\n".join([enc[0]] + ["extra/" + line for line in enc[1:]]) + "\n")
    return path


def _args(labels: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--labels", str(labels), "--out", str(out), "--net-config", TINY_NET, "--preprocess", TINY_PRE,
            "--no-progress", "--threads", "1", "--per-class", "8", "--batch-size", "8", "--val-fraction", "0.34",
            *extra]


def test_dry_run_end_to_end(tiny_labels, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_labels, out, "--dry-run")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["best_epoch"] == 1
    assert all(printed["train_class_counts"][c] > 0 for c in CLASSES)
    m = load_model(out, device="cpu")
    assert m.preprocess.size == 64 and m.version == printed["version"]
    probs = predict_proba(m, torch.rand(2, 3, 64, 64))
    assert probs.shape == (2, len(CLASSES))
    report = json.loads((out / "train_report.json").read_text())
    assert report["data"]["split"]["shared_patients"] == 0
    assert report["settings"]["augment"] is True
    assert m.extra["training"]["data"]["train"]["patients_per_class"] == report["data"]["train"]["patients_per_class"]


def test_broken_set_refuses_to_start(tiny_labels, tmp_path, capsys):
    text = tiny_labels.read_text().splitlines()
    bad = tiny_labels.parent / "bad_labels.csv"  # beside the good one, so its relative paths resolve
    fields = text[3].split(",")  # the region column of line 4 becomes an unknown class
    fields[HEADER.index("region")] = "necks"
    text[3] = ",".join(fields)
    bad.write_text("\n".join(text) + "\n")
    assert main(_args(bad, tmp_path / "out", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: unknown region" in err and "problem(s)" in err
    assert err.count("unknown region") == 1
    assert not (tmp_path / "out" / "model.pt").exists()
    # a set without one of the classes is refused too
    keep = [line for line in text if ",legs," not in line and ",pelvis|legs," not in line]
    bad.write_text("\n".join(keep[:3] + keep[4:]) + "\n")
    assert main(_args(bad, tmp_path / "out", "--dry-run")) == 2
    assert "class 'legs' has no slice" in capsys.readouterr().err


def test_resume_continues_and_seed_makes_runs_repeatable(tiny_labels, tmp_path):
    def settings(out: Path, epochs: int, resume: bool = False) -> TrainSettings:
        return TrainSettings(labels=[str(tiny_labels)], out=str(out), epochs=epochs, per_class=8, batch_size=8,
                             val_fraction=0.34, seed=5, deterministic=True, progress=False, resume=resume,
                             patience=100, threads=1, net_config=json.loads(TINY_NET),
                             preprocess=json.loads(TINY_PRE))

    straight = train(settings(tmp_path / "a", 2))
    first = train(settings(tmp_path / "b", 2))
    assert [h["train_loss"] for h in first["history"]] == [h["train_loss"] for h in straight["history"]]
    # an existing state is not overwritten without --resume
    with pytest.raises(ValueError, match="--resume"):
        train(settings(tmp_path / "b", 3))
    resumed = train(settings(tmp_path / "b", 3, resume=True))
    assert len(resumed["history"]) == 3
    assert resumed["history"][:2] == first["history"]
    state = torch.load(tmp_path / "b" / STATE_NAME, weights_only=True)
    assert int(state["epoch"]) == 2


def test_val_fraction_zero_trains_every_patient_for_all_epochs_and_keeps_the_last(tiny_labels, tmp_path, capsys):
    out = tmp_path / "refit"
    # patience 1 would stop a run with a validation split early; without one every epoch runs
    assert main(_args(tiny_labels, out, "--epochs", "3", "--patience", "1", "--val-fraction", "0")) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "train_report.json").read_text())
    assert len(report["history"]) == 3 and report["best_epoch"] == 3
    assert all(h["val_error"] is None for h in report["history"])
    assert report["validation"] is None and report["data"]["validation"]["slices"] == 0
    assert report["data"]["split"]["val_patients"] == 0
    assert report["data"]["train"]["slices"] == len(ds.read_labels(tiny_labels))
    # the checkpoint is the last epoch's net: the training state holds the same weights
    m = load_model(out, device="cpu")
    assert m.version == printed["version"] == report["version"]
    state = torch.load(out / STATE_NAME, weights_only=True)
    assert int(state["epoch"]) == 2
    net_state = m.net.state_dict()
    assert all(torch.equal(v, net_state[k]) for k, v in state["net"].items())
    # such a model has no validation split to evaluate on, and evaluate says so
    assert main(["evaluate", "--model", str(out), "--split", "validation"]) == 2
    assert "no validation split" in capsys.readouterr().err


def test_average_last_epochs_is_the_model_with_batchnorm_recomputed(tiny_labels, tmp_path):
    settings = TrainSettings(labels=[str(tiny_labels)], out=str(tmp_path / "avg"), epochs=3, per_class=8, batch_size=8,
                             val_fraction=0.34, seed=5, deterministic=True, progress=False, patience=100, threads=1,
                             average_last=2, net_config=json.loads(TINY_NET), preprocess=json.loads(TINY_PRE))
    report = train(settings)
    assert report["averaged_epochs"] == [2, 3] and report["best_epoch"] == 3
    assert report["validation"]["n"] == report["data"]["validation"]["slices"]  # the average is evaluated
    state = torch.load(tmp_path / "avg" / STATE_NAME, weights_only=True)
    assert int(state["averaged"]) == 2
    model = load_model(tmp_path / "avg", device="cpu")
    assert model.version == report["version"]
    weights = model.net.state_dict()
    last = state["net"]  # the weights after epoch 3
    for k, total in state["average"].items():
        assert torch.allclose(weights[k].double(), total / 2, atol=1e-6), k
    assert any(not torch.equal(weights[k], last[k]) for k in state["average"])  # not just the last epoch
    means = [k for k in weights if k.endswith("running_mean")]
    # statistics recomputed on training inputs: neither the fresh net's zeros nor the last epoch's
    assert means and all(float(weights[k].abs().sum()) > 0 and not torch.equal(weights[k], last[k]) for k in means)
    with pytest.raises(ValueError, match="average_last"):
        train(TrainSettings(**{**settings.__dict__, "out": str(tmp_path / "bad"), "average_last": 4}))


def test_class_balanced_sampling_and_boundary_rows(tiny_labels):
    from trainer.train import class_pools, sample_epoch

    rows = ds.read_labels(tiny_labels)
    pools = class_pools(rows)
    gen = torch.Generator().manual_seed(0)
    idx, tgt = sample_epoch(pools, 40, gen)
    assert torch.bincount(tgt, minlength=len(CLASSES)).tolist() == [40] * len(CLASSES)
    for i, t in zip(idx.tolist(), tgt.tolist()):
        assert CLASSES[t] in rows[i].classes  # a boundary row is drawn under either of its classes
    again = sample_epoch(pools, 40, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], idx)


def test_soft_tissue_clipping_and_zoom_of_inputs():
    from dicomnode.classification.imaging.preprocess import PreprocessParams
    from trainer.train import make_inputs, random_zoom

    p = PreprocessParams(size=32, pixel_mm=12.8)
    hu = torch.full((4, 32, 32), -1024, dtype=torch.int16)
    hu[:, 8:24, 8:24] = 40
    hu[:, 12:20, 12:20] = -800  # "lung"
    hu[:, 15:17, 15:17] = 1000  # "bone"
    clipped = make_inputs(hu, p, torch.Generator().manual_seed(0), clip_prob=1.0)
    plain = make_inputs(hu, p)
    assert plain[:, 2].max() > 0.7 and clipped[:, 2].max() < 0.4  # bone gone from the bone window
    assert clipped[0, 1, 13, 13] == 0.0  # lung read as air after clipping
    zoomed = random_zoom(hu.float(), torch.tensor([True, False, True, False]), torch.Generator().manual_seed(1),
                         p.pad_hu)
    assert torch.equal(zoomed[1], hu[1].float()) and not torch.equal(zoomed[0], hu[0].float())
