"""``python -m trainer.robustness``: the perturbations change what they say, and the errors are counted."""

from __future__ import annotations

import json

import pytest
import torch

from dicomnode.classification.model import CLASSES, load_model, make_untrained_checkpoint
from tests.conftest import CT_FIXTURES
from trainer.datasets import read_labels
from trainer.robustness import PERTURBATIONS, body_noise, down_up, main, robustness, unsharp


def _roughness(x: torch.Tensor) -> float:
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def test_blur_sharpening_and_noise_on_a_step_edge():
    hu = torch.full((1, 32, 32), -1000.0)
    hu[:, :, 16:] = 40.0  # air | soft tissue
    for f in (1.3, 1.8):
        b = down_up(hu, f)
        assert b.shape == hu.shape and _roughness(b) <= _roughness(hu) + 1e-3
        assert float(b[0, 5, 15]) > -1000.0 or float(b[0, 5, 16]) < 40.0  # the edge is spread
    assert float(down_up(hu, 1.8)[0, 5, 14]) > float(down_up(hu, 1.3)[0, 5, 14]) - 1e-3
    s = unsharp(hu)
    assert float(s[0, 5, 16]) > 40.0 and float(s[0, 5, 15]) < -1000.0  # overshoot on both sides of the edge
    assert torch.equal(s[:, :, :14], hu[:, :, :14]) and torch.equal(s[:, :, 18:], hu[:, :, 18:])
    n = body_noise(hu, 10.0, torch.Generator().manual_seed(0))
    assert torch.equal(n[:, :, :16], hu[:, :, :16])  # air stays air
    assert 8.0 < float((n[:, :, 16:] - 40.0).std()) < 12.0
    assert torch.equal(PERTURBATIONS["none"](hu, torch.Generator()), hu)


def test_errors_per_perturbation_on_real_slices(tmp_path, capsys):
    model = load_model(make_untrained_checkpoint(tmp_path / "m", seed=3), device="cpu")
    rows = read_labels(CT_FIXTURES / "labels.csv")
    result = robustness(model, rows)
    assert result["n"] == len(rows) and not result["unreadable"]
    assert set(result["errors"]) == set(PERTURBATIONS)
    for name, wrong in result["wrong"].items():
        assert len(wrong) == result["errors"][name] <= result["n"]
        assert all(" called " in w and w.split(" called ")[1] in CLASSES for w in wrong)
    # unperturbed, the errors are those dicomnode evaluate counts
    from trainer.evaluate import evaluate

    assert result["errors"]["none"] == evaluate(model, rows)["errors"]
    assert main(["--model", str(tmp_path / "m"), "--labels", str(CT_FIXTURES / "labels.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == result["errors"]
    assert main(["--model", str(tmp_path / "nothing"), "--labels", str(CT_FIXTURES / "labels.csv")]) == 2
    assert "trainer.robustness:" in capsys.readouterr().err
