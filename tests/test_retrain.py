"""Scheduled retraining: promote only when the candidate is not worse on the held-out manifest."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from dicomnode.config import ConfigError, load_config
from dicomnode.classification.imaging.preprocess import PreprocessParams
from dicomnode.classification.model import CLASSES, build_net, load_model, read_checkpoint, save_checkpoint
from tests.conftest import CT_FIXTURES, SHARED_DATA
from tests.trainer_data import write_subset_labels
from trainer.retrain import HISTORY, cron_trigger, crontab_days, retrain_once, run_scheduler

HELD_OUT = CT_FIXTURES / "labels.csv"  # 19 real slices of 4 patients: neck, lungs, liver, lungs|liver
TINY = {"widths": [4, 8, 8, 8, 8], "kernels": [3, 3, 3, 3, 3], "fc": [16]}
TINY_PRE = {"size": 64, "pixel_mm": 6.4}


def constant_checkpoint(path, cls: str, version: str):
    """A real checkpoint whose net always predicts ``cls`` (zero head weights, a large bias)."""
    pre = PreprocessParams(**TINY_PRE)
    net_config = {"in_channels": pre.channels, "input_size": pre.size, **TINY}
    net = build_net(net_config)
    head = net.head[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-5.0)
        head.bias[CLASSES.index(cls)] = 5.0
    return save_checkpoint(path, net, net_config, pre, version)


def _config(tmp_path, model_path: str = "", **extra):
    overrides = {"data_dir": str(tmp_path / "data"), "model.path": model_path,
                 "retrain.held_out_labels": str(HELD_OUT), "retrain.train_labels": [str(HELD_OUT)],
                 "retrain.out_dir": str(tmp_path / "retrain")}
    overrides.update(extra)
    return load_config(None, overrides)


def _train_writing(checkpoint):
    """A train function that 'trains' by writing a given real checkpoint where train() writes its best one."""
    def fn(settings):
        out = Path(settings.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, out / "model.pt")
        return {"best_epoch": 1, "labels": settings.labels}
    return fn


def test_worse_candidate_is_not_promoted(tmp_path):
    current = constant_checkpoint(tmp_path / "current.pt", "lungs", "current-lungs")
    target = tmp_path / "node" / "model.pt"
    target.parent.mkdir()
    shutil.copyfile(current, target)
    candidate = constant_checkpoint(tmp_path / "cand.pt", "legs", "candidate-legs")
    cfg = _config(tmp_path, str(target))
    result = retrain_once(cfg, train_fn=_train_writing(candidate))
    assert result["promoted"] is False and "worse" in result["reason"]
    assert result["candidate_metrics"]["error"] == 1.0  # the held-out set has no legs
    assert result["current_metrics"]["error"] < 1.0
    assert read_checkpoint(target)["version"] == "current-lungs"
    report = json.loads((tmp_path / "retrain" / result["run_dir"].split("/")[-1] / "retrain_report.json").read_text())
    assert report["promoted"] is False
    history = (tmp_path / "retrain" / "retrain_history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["promoted"] is False


def test_better_and_equal_candidates_are_promoted(tmp_path):
    target = tmp_path / "node" / "model.pt"
    target.parent.mkdir()
    shutil.copyfile(constant_checkpoint(tmp_path / "cur.pt", "legs", "current-legs"), target)
    cfg = _config(tmp_path, str(target))
    better = constant_checkpoint(tmp_path / "better.pt", "lungs", "candidate-lungs")
    t1 = datetime(2026, 1, 4, 2, 0, tzinfo=timezone.utc)
    result = retrain_once(cfg, train_fn=_train_writing(better), now=t1)
    assert result["promoted"] is True
    assert result["candidate_metrics"]["error"] < result["current_metrics"]["error"]
    assert load_model(cfg.model.path).version == "candidate-lungs"
    assert read_checkpoint(target.with_name("model.pt.previous"))["version"] == "current-legs"
    # Same predictions, new version: not worse, so promoted.
    same = constant_checkpoint(tmp_path / "same.pt", "lungs", "candidate-lungs-2")
    result = retrain_once(cfg, train_fn=_train_writing(same), now=datetime(2026, 1, 11, 2, 0, tzinfo=timezone.utc))
    assert result["promoted"] is True
    assert result["candidate_metrics"]["error"] == result["current_metrics"]["error"]
    assert read_checkpoint(target)["version"] == "candidate-lungs-2"


def test_empty_model_path_needs_a_config_file_to_record_the_promotion(tmp_path):
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"data_dir: {tmp_path / 'data'}\nmodel:\n  path: ''\nretrain:\n"
                        f"  held_out_labels: {HELD_OUT}\n  train_labels: [{HELD_OUT}]\n"
                        f"  out_dir: {tmp_path / 'retrain'}\n")
    cfg = load_config(cfg_file)
    # A candidate that beats any model on this set cannot exist for sure, so make the current model the
    # shipped default if there is one; either way the decision must follow the metrics.
    good = constant_checkpoint(tmp_path / "good.pt", "lungs", "candidate-lungs")
    result = retrain_once(cfg, train_fn=_train_writing(good))
    cur = result["current_metrics"]
    expect = cur is None or (result["candidate_metrics"]["error"] <= cur["error"]
                             and (cur["mean_auc"] is None or result["candidate_metrics"]["mean_auc"] >= cur["mean_auc"]))
    assert result["promoted"] is False  # no config file given
    if expect:
        assert "no config file" in result["reason"]
        result = retrain_once(cfg, cfg_file, train_fn=_train_writing(good),
                              now=datetime(2030, 1, 1, tzinfo=timezone.utc))
        assert result["promoted"] is True
        assert load_model(load_config(cfg_file).model.path).version == "candidate-lungs"


@pytest.mark.skipif(not (SHARED_DATA / "openkbp" / "labels.csv").is_file(), reason="../shared/data not present")
def test_retrain_once_with_a_real_training_run(tmp_path):
    labels = write_subset_labels(tmp_path / "train.csv")
    target = tmp_path / "node" / "model.pt"
    target.parent.mkdir()
    shutil.copyfile(constant_checkpoint(tmp_path / "cur.pt", "legs", "current-legs"), target)
    cfg = _config(tmp_path, str(target), **{"retrain.train_labels": [str(labels)]})
    result = retrain_once(cfg, train_overrides={
        "dry_run": True, "dry_run_batches": 2, "per_class": 8, "batch_size": 16, "val_fraction": 0.0,
        "net_config": TINY, "preprocess": TINY_PRE, "threads": 1})
    assert result["held_out_patients_in_training"] == 0
    cand, cur = result["candidate_metrics"], result["current_metrics"]
    assert cand["n"] == cur["n"] == 19 and cur["error"] == 1.0
    assert result["candidate"]["version"].startswith("convnet-")
    not_worse = cand["error"] <= cur["error"] and (cur["mean_auc"] is None or cand["mean_auc"] >= cur["mean_auc"])
    assert result["promoted"] is not_worse
    assert read_checkpoint(target)["version"] == (result["candidate"]["version"] if not_worse else "current-legs")


def test_config_checks_and_scheduler(tmp_path):
    with pytest.raises(ConfigError, match="retrain.held_out_labels"):
        retrain_once(load_config(None, {"data_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"retrain.train_labels\[0\]"):
        retrain_once(_config(tmp_path, **{"retrain.train_labels": [str(tmp_path / "missing.csv")]}))
    with pytest.raises(ConfigError, match="retrain.cron"):
        cron_trigger(_config(tmp_path, **{"retrain.cron": "every sunday"}))
    trigger = cron_trigger(_config(tmp_path, **{"retrain.cron": "30 2 * * 0"}))
    nxt = trigger.get_next_fire_time(None, datetime(2026, 11, 26, 0, 0, tzinfo=timezone.utc))
    assert (nxt.year, nxt.month, nxt.day, nxt.hour, nxt.minute) == (2026, 11, 29, 2, 30)  # the next Sunday
    assert crontab_days("1-5") == "mon,tue,wed,thu,fri" and crontab_days("7") == "sun"
    stop = threading.Event()
    stop.set()
    assert run_scheduler(_config(tmp_path), None, stop) == 2  # off by default
    calls = []
    assert run_scheduler(_config(tmp_path, **{"retrain.enabled": True}), None, stop,
                         job=lambda *a: calls.append(a)) == 0
    assert calls == []  # stopped before the first cron time


def test_mining_failure_is_recorded_and_raised(tmp_path):
    from tests.conftest import free_port
    from trainer.mine import MiningError

    port = free_port()  # nothing listens there: the PACS refuses the association
    cfg = _config(tmp_path, **{"retrain.keywords": ["liver"], "mining.pacs.ae_title": "PACS",
                               "mining.pacs.port": port, "mining.move_destination.ae_title": "MINER",
                               "mining.timeout_s": 5.0})
    with pytest.raises(MiningError):
        retrain_once(cfg, train_fn=lambda s: pytest.fail("training must not start when mining failed"))
    history = [json.loads(line) for line in (tmp_path / "retrain" / HISTORY).read_text().splitlines()]
    assert history[-1]["promoted"] is False and "MiningError" in history[-1]["error"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "openkbp" / "labels.csv").is_file(), reason="../shared/data not present")
def test_retrain_mines_a_real_pacs_trains_evaluates_and_promotes(tmp_path):
    """Orthanc holds a liver CT; the scheduled run mines it by keyword, trains on it plus public data,
    compares with the current model on the held-out manifest and promotes the candidate when not worse."""
    import pydicom
    from pydicom.uid import generate_uid

    from tests.conftest import free_port
    from tests.orthanc import orthanc_server
    from trainer.mine import parse_remote

    miner_port = free_port()
    files = sorted((CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k").glob("*.dcm"))
    study, series = generate_uid(), generate_uid()
    datasets = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDescription, ds.BodyPartExamined = "CT LIVER", "LIVER"
        datasets.append(ds)
    labels = write_subset_labels(tmp_path / "public.csv")
    target = tmp_path / "node" / "model.pt"
    target.parent.mkdir()
    shutil.copyfile(constant_checkpoint(tmp_path / "cur.pt", "legs", "current-legs"), target)
    with orthanc_server(tmp_path / "orthanc", modalities={"miner": ("MINER", "127.0.0.1", miner_port)}) as o:
        o.store(datasets)
        cfg = _config(tmp_path, str(target), **{
            "retrain.keywords": ["liver"], "retrain.train_labels": [str(labels)],
            "mining.pacs": vars(parse_remote(o.address)), "mining.slices_per_series": 4, "mining.timeout_s": 20.0,
            "mining.move_destination": {"ae_title": "MINER", "host": "127.0.0.1", "port": miner_port},
            "listener.fsync": False})
        result = retrain_once(cfg, train_overrides={
            "dry_run": True, "dry_run_batches": 2, "per_class": 8, "batch_size": 16, "val_fraction": 0.0,
            "net_config": TINY, "preprocess": TINY_PRE, "threads": 1})
    mined = result["mined_labels"]
    assert len(mined) == 1
    with open(mined[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["region"] for r in rows} == {"liver"}
    # The mined slices were part of the training data of the candidate.
    report = json.loads((Path(result["run_dir"]) / "candidate" / "train_report.json").read_text())
    assert str(Path(mined[0]).resolve()) in report["data"]["labels_files"]
    cand, cur = result["candidate_metrics"], result["current_metrics"]
    not_worse = cand["error"] <= cur["error"] and (cur["mean_auc"] is None or cand["mean_auc"] >= cur["mean_auc"])
    assert result["promoted"] is not_worse
    assert read_checkpoint(target)["version"] == (result["candidate"]["version"] if not_worse else "current-legs")
