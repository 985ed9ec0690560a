"""Promote: the model lands atomically where model.path points; the config records it; bad models refused."""

from __future__ import annotations

import json

import torch

from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.classification.model import load_model, make_untrained_checkpoint, read_checkpoint
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
    record2 = promote(second.parent, cfg_file)
    assert record2["previous_version"] == "untrained-test-model-seed1" and record2["config_updated"] is False
    assert load_model(target).version == "untrained-test-model-seed2"
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
