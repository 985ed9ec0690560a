"""Promote: the model lands atomically where model.path points; the config records it; bad models refused."""

from __future__ import annotations

import json

import torch

from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.classification.model import (
    load_model,
    load_onnx_model,
    make_untrained_checkpoint,
    onnx_twin_path,
    read_checkpoint,
)
from tests.conftest import REPO
from trainer.promote import promote, set_model_path_in_yaml


def _example_config(tmp_path):
    """The shipped example config with data_dir moved to a temporary folder (comments kept)."""
    text = (REPO / "config.example.yaml").read_text()
    text = text.replace("data_dir: ./dicomnode-data", f"data_dir: {tmp_path / 'data'}")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    return cfg


def test_promote_sets_model_path_and_keeps_the_rest_of_the_config(tmp_path, capsys):
    cfg_file = _example_config(tmp_path)
    before = cfg_file.read_text().splitlines()
    first = make_untrained_checkpoint(tmp_path / "run1", seed=1)
    rc = main(["promote", str(first.parent), "--config", str(cfg_file), "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    target = tmp_path / "data" / "models" / "model.pt"
    assert record["target"] == str(target.resolve()) and record["config_updated"] is True
    assert record["previous_version"] is None
    after = cfg_file.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1
    assert changed[0][1].strip() == f'path: "{target.resolve()}"'
    cfg = load_config(cfg_file)
    assert cfg.model.path == str(target.resolve())
    assert load_model(cfg.model.path).version == "untrained-test-model-seed1"
    assert record["sha256"] and not target.with_name("model.pt.previous").exists()

    # A second promotion replaces the file, keeps the previous one, leaves the config alone.
    second = make_untrained_checkpoint(tmp_path / "run2", seed=2)
    (second.parent / "MODEL_CARD.md").write_text("# card\n")
    onnx_twin_path(second).unlink()  # a checkpoint of an older dicomnode: promote makes the twin
    record2 = promote(second.parent, cfg_file)
    assert record2["previous_version"] == "untrained-test-model-seed1" and record2["config_updated"] is False
    assert load_model(target).version == "untrained-test-model-seed2"
    assert load_onnx_model(target).version == "untrained-test-model-seed2"  # the twin the node infers with
    assert read_checkpoint(target.with_name("model.pt.previous"))["version"] == "untrained-test-model-seed1"
    assert (target.parent / "MODEL_CARD.md").read_text() == "# card\n"
    history = [json.loads(line) for line in (target.parent / "promotions.jsonl").read_text().splitlines()]
    assert [h["version"] for h in history] == ["untrained-test-model-seed1", "untrained-test-model-seed2"]
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_promote_into_a_configured_directory(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"# my node\nmodel:\n  # the checkpoint\n  path: {models}\nport: 11113\n")
    ckpt = make_untrained_checkpoint(tmp_path / "run", seed=4)
    record = promote(ckpt, cfg_file)
    assert record["target"] == str((models / "model.pt").resolve()) and not record["config_updated"]
    assert load_model(load_config(cfg_file).model.path).version == "untrained-test-model-seed4"
    assert cfg_file.read_text().startswith("# my node\nmodel:\n  # the checkpoint\n")


def test_set_model_path_without_a_model_block(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("port: 11113  # keep me\n")
    set_model_path_in_yaml(cfg_file, "/x/model.pt")
    assert load_config(cfg_file).model.path == "/x/model.pt"
    assert "# keep me" in cfg_file.read_text()
    inline = tmp_path / "i.yaml"
    inline.write_text("model: {path: ''}\nport: 11114\n")
    set_model_path_in_yaml(inline, "/y/model.pt")
    cfg = load_config(inline)
    assert cfg.model.path == "/y/model.pt" and cfg.port == 11114


def test_promote_refuses_a_bad_model_and_changes_nothing(tmp_path, capsys):
    cfg_file = _example_config(tmp_path)
    before = cfg_file.read_text()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["promote", str(junk), "--config", str(cfg_file)]) == 2
    assert str(junk) in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert main(["promote", str(foreign), "--config", str(cfg_file)]) == 2
    assert "not a dicomnode checkpoint" in capsys.readouterr().err
    assert main(["promote", str(tmp_path / "missing"), "--config", str(cfg_file)]) == 2
    assert cfg_file.read_text() == before
    assert not (tmp_path / "data" / "models").exists()


def _series_copy(files, tag: str) -> list[bytes]:
    """The slices of ``files`` as a new series (new Series/SOP Instance UIDs), as bytes."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    out = []
    series_uid = generate_uid(entropy_srcs=[tag, "series"])
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[tag, ds.SOPInstanceUID])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_first_promote_reaches_a_running_worker_started_with_an_empty_model_path(tmp_path):
    """A real `dicomnode worker` process, started with model.path empty (the shipped model), then a real
    `dicomnode promote`: the worker's next job uses the promoted model, without a restart."""
    import datetime as dt
    import subprocess
    import sys
    import time

    import pytest
    import yaml
    from sqlalchemy import select

    from dicomnode.classification.model import load_model as load
    from dicomnode.db.models import Job, Series, utcnow
    from dicomnode.db.session import open_index, upgrade
    from dicomnode.queue.stability import mark_stable_series
    from dicomnode.receive.ingest import SUCCESS, NodeContext, store_instance
    from tests.conftest import CT_FIXTURES, stop_node

    files = sorted((CT_FIXTURES / "series" / "dcmqi_ge_3slice").glob("*.dcm"))
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "node"), "model": {"path": ""},
        "listener": {"fsync": False, "min_free_space_mb": 1},
        "worker": {"poll_interval_s": 0.1, "min_slices": 3, "threads": 1, "early": False}}))
    cfg = load_config(cfg_file)
    cfg.resolved_data_dir.mkdir(parents=True)
    upgrade(cfg.resolved_database_url, backup=False)
    engine, sessions = open_index(cfg)
    ctx = NodeContext(cfg, sessions)
    shipped = load(None).version

    def classify(blobs) -> str:
        for blob in blobs:
            assert store_instance(ctx, blob, "TESTSCU") == SUCCESS
        mark_stable_series(sessions, 1.0, now=utcnow() + dt.timedelta(hours=1))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            with sessions() as s:
                jobs = list(s.scalars(select(Job)))
                if jobs and all(j.state in ("done", "failed") for j in jobs):
                    assert all(j.state == "done" for j in jobs), [j.error for j in jobs]
                    newest = s.scalars(select(Series).order_by(Series.id.desc())).first()
                    return newest.model_version
            time.sleep(0.1)
        pytest.fail("timed out waiting for the worker to finish the job\n" + log.read_text())

    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(cfg_file)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        assert classify([f.read_bytes() for f in files]) == shipped
        candidate = make_untrained_checkpoint(tmp_path / "run", seed=7)
        assert main(["promote", str(candidate.parent), "--config", str(cfg_file), "--json"]) == 0
        assert load_config(cfg_file).model.path  # the YAML records it for the next start
        assert classify(_series_copy(files, "after-promote")) == "untrained-test-model-seed7"
    finally:
        stop_node(proc)
        engine.dispose()
