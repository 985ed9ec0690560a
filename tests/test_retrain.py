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
    """With model.path empty the current model is the shipped default; a candidate with the same weights is
    not worse, so it is promoted, but only when a config file is given to record the new model.path."""
    from dicomnode.classification.model import checkpoint_path

    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"data_dir: {tmp_path / 'data'}\nmodel:\n  path: ''\nretrain:\n"
                        f"  held_out_labels: {HELD_OUT}\n  train_labels: [{HELD_OUT}]\n"
                        f"  out_dir: {tmp_path / 'retrain'}\n")
    cfg = load_config(cfg_file)
    shipped = checkpoint_path(None)
    result = retrain_once(cfg, train_fn=_train_writing(shipped))
    assert result["current_metrics"] == {**result["candidate_metrics"],
                                         "model_version": result["current_metrics"]["model_version"]}
    assert result["promoted"] is False and "no config file" in result["reason"]
    result = retrain_once(cfg, cfg_file, train_fn=_train_writing(shipped), now=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert result["promoted"] is True
    promoted = load_config(cfg_file).model.path
    assert promoted and Path(promoted).is_file() and Path(promoted) != shipped
    assert read_checkpoint(promoted)["version"] == read_checkpoint(shipped)["version"]


@pytest.mark.skipif(not (SHARED_DATA / "openkbp" / "labels.csv").is_file(), reason="../shared/data not present")
def test_retrain_once_with_a_real_training_run(tmp_path):
    labels = write_subset_labels(tmp_path / "train.csv")
    target = tmp_path / "node" / "model.pt"
    target.parent.mkdir()
    shutil.copyfile(constant_checkpoint(tmp_path / "cur.pt", "legs", "current-legs"), target)
    cfg = _config(tmp_path, str(target), **{"retrain.train_labels": [str(labels)]})
    overrides = {"dry_run": True, "dry_run_batches": 2, "per_class": 8, "batch_size": 16, "val_fraction": 0.0,
                 "net_config": TINY, "preprocess": TINY_PRE, "threads": 1}
    # A strict comparison the barely trained candidate cannot pass: it is not promoted...
    result = retrain_once(cfg, train_overrides=overrides, tolerance=-1.0,
                          now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert result["held_out_patients_in_training"] == 0
    cand, cur = result["candidate_metrics"], result["current_metrics"]
    assert cand["n"] == cur["n"] == 19 and cur["error"] == 1.0  # the current model says legs, the set has none
    assert result["candidate"]["version"].startswith("convnet-")
    assert result["promoted"] is False and "worse" in result["reason"]
    assert read_checkpoint(target)["version"] == "current-legs"
    # ...and with a tolerance that accepts any candidate, the real trained checkpoint is installed.
    result = retrain_once(cfg, train_overrides=overrides, tolerance=1.0, now=datetime(2026, 1, 2, tzinfo=timezone.utc))
    assert result["promoted"] is True
    assert read_checkpoint(target)["version"] == result["candidate"]["version"] != "current-legs"
    assert read_checkpoint(target.with_name("model.pt.previous"))["version"] == "current-legs"


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
    assert run_scheduler(_config(tmp_path), None, threading.Event()) == 2  # off by default: returns at once


def test_the_scheduler_runs_the_job_and_survives_a_failed_run(tmp_path):
    """The schedule fires the job (an interval trigger stands in for the cron's next Sunday), a run that
    raises does not end it, and setting stop ends it."""
    from apscheduler.triggers.interval import IntervalTrigger

    cfg = _config(tmp_path, **{"retrain.enabled": True})
    stop = threading.Event()
    calls = []

    def job(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("the first run fails")
        stop.set()

    assert run_scheduler(cfg, "node.yaml", stop, job=job, trigger=IntervalTrigger(seconds=0.05)) == 0
    assert len(calls) >= 2 and calls[0] == (cfg, "node.yaml")


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
            "net_config": TINY, "preprocess": TINY_PRE, "threads": 1}, tolerance=1.0)
    mined = result["mined_labels"]
    assert len(mined) == 1
    with open(mined[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["region"] for r in rows} == {"liver"}
    # The mined slices were part of the training data of the candidate.
    report = json.loads((Path(result["run_dir"]) / "candidate" / "train_report.json").read_text())
    assert str(Path(mined[0]).resolve()) in report["data"]["labels_files"]
    # tolerance 1.0 accepts any candidate: the model trained on the mined slices is installed.
    assert result["candidate_metrics"]["n"] == result["current_metrics"]["n"]
    assert result["promoted"] is True
    assert read_checkpoint(target)["version"] == result["candidate"]["version"] != "current-legs"
