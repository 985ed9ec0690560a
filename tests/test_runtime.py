"""The node's inference on a checkpoint's ONNX twin (model/onnx_twin.py, model/runtime.py): the same
probabilities as torch, used only while it matches its checkpoint, and no torch in ``dicomnode classify``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dicomnode.classification.imaging.pixels import read_hu
from dicomnode.classification.imaging.preprocess import preprocess_batch
from dicomnode.classification.model import (
    LoadedModel,
    OnnxModel,
    TwinUnusable,
    build_net,
    load_inference_model,
    load_model,
    load_onnx_model,
    make_untrained_checkpoint,
    onnx_twin_path,
    predict_proba,
    save_checkpoint,
)
from dicomnode.classification.model import runtime
from dicomnode.classification.model.checkpoint import predict_proba as predict_proba_torch
from dicomnode.classification.model.onnx_twin import onnx_graph
from tests.conftest import CT_FIXTURES

J2K_SERIES = CT_FIXTURES / "series" / "lungpetctdx_a0001_philips_upper_abdomen_kernelB_j2k"
AXIAL_SLICES = ("cq500_head_j2k_lossy.dcm", "ctimage_deflated.dcm", "ctimage_rle.dcm", "pydicom_ct_small.dcm")


def _real_slices(params) -> np.ndarray:
    """The preprocessed slices of a real series and of single slices of other scanners (head included)."""
    files = sorted(J2K_SERIES.glob("*.dcm")) + [CT_FIXTURES / "slices" / name for name in AXIAL_SLICES]
    return preprocess_batch([read_hu(f) for f in files], params)


def test_the_shipped_twin_gives_the_checkpoints_probabilities_on_real_slices():
    onnx_model, torch_model = load_onnx_model(None), load_model(None, "cpu")
    assert onnx_model.version == torch_model.version and onnx_model.classes == torch_model.classes
    assert onnx_model.preprocess == torch_model.preprocess
    x = _real_slices(torch_model.preprocess)
    assert len(x) >= 10
    got, expected = predict_proba(onnx_model, x), predict_proba_torch(torch_model, x)
    assert got.shape == expected.shape == (len(x), len(torch_model.classes)) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert predict_proba(onnx_model, x[:0]).shape == (0, len(torch_model.classes))
    with pytest.raises(ValueError, match="expected \\(N, C, S, S\\)"):
        predict_proba(onnx_model, x[0])


def test_save_checkpoint_writes_a_twin_for_other_architectures(tmp_path):
    """Strides, kernels, no BatchNorm, two hidden layers: the twin follows the net's config."""
    torch.manual_seed(3)
    model = load_model(make_untrained_checkpoint(tmp_path / "a" / "model.pt"), "cpu")
    net_config = {"in_channels": 3, "input_size": 48, "num_classes": 6, "widths": [6, 8, 8], "kernels": [5, 3, 1],
                  "strides": [2, 1, 1], "pools": [2, 1, 2], "fc": [12, 10], "batchnorm": False}
    net = build_net(net_config)
    path = save_checkpoint(tmp_path / "b", net, net_config, model.preprocess.__class__(size=48, pixel_mm=8.0), "v-b")
    assert onnx_twin_path(path).is_file()
    twin, torch_model = load_onnx_model(path), load_model(path, "cpu")
    x = np.random.default_rng(1).random((7, 3, 48, 48), dtype=np.float32)
    np.testing.assert_allclose(predict_proba(twin, x), predict_proba_torch(torch_model, x), atol=1e-5)


def test_a_layer_without_an_onnx_mapping_is_named():
    net = build_net({"input_size": 32, "widths": [4, 4], "kernels": [3, 3], "strides": [1, 1], "pools": [2, 2],
                     "fc": [8]})
    net.hidden[2] = torch.nn.Tanh()
    with pytest.raises(TypeError, match="Tanh has no ONNX mapping"):
        onnx_graph(net)


def test_a_twin_that_does_not_match_its_checkpoint_is_not_used(tmp_path, caplog):
    a = make_untrained_checkpoint(tmp_path / "a" / "model.pt", seed=1)
    b = make_untrained_checkpoint(tmp_path / "b" / "model.pt", seed=2)
    assert isinstance(load_inference_model(a, "cpu"), OnnxModel)
    shutil.copy(onnx_twin_path(b), onnx_twin_path(a))  # a checkpoint replaced without its twin, say
    with pytest.raises(TwinUnusable, match="another checkpoint"):
        load_onnx_model(a)
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        fallback = load_inference_model(a, "cpu")
    assert isinstance(fallback, LoadedModel) and fallback.version.endswith("seed1")
    assert "inference runs on torch" in caplog.text and "SHA-256 differs" in caplog.text

    onnx_twin_path(a).unlink()
    with pytest.raises(TwinUnusable, match="no ONNX twin"):
        load_onnx_model(a)
    onnx_twin_path(a).write_bytes(b"not onnx")
    with pytest.raises(TwinUnusable, match="onnxruntime cannot load it"):
        load_onnx_model(a)
    assert isinstance(load_inference_model(a, "cpu"), LoadedModel)
    with pytest.raises(FileNotFoundError, match="model checkpoint not found"):
        load_inference_model(tmp_path / "missing.pt", "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable dicomnode checkpoint"):  # torch's reading names it
        load_inference_model(tmp_path / "junk.pt", "cpu")


def test_torch_is_used_without_onnxruntime_and_on_a_gpu(tmp_path, monkeypatch, caplog):
    path = make_untrained_checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: True)  # auto: CUDA goes to torch
    assert isinstance(load_inference_model(path, "auto"), LoadedModel)
    assert isinstance(load_inference_model(path, "cpu"), OnnxModel)  # an explicit cpu keeps the twin
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: False)
    assert isinstance(load_inference_model(path, "auto"), OnnxModel)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        assert isinstance(load_inference_model(path, "auto"), LoadedModel)
    assert "onnxruntime is not installed" in caplog.text


CLASSIFY_WITHOUT_TORCH = r"""
import json, sys
from dicomnode.cli import main
code = main(["classify", "--json", "--no-slices", "--model", sys.argv[1], sys.argv[2]])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_dicomnode_classify_never_imports_torch(tmp_path):
    """The whole classify process on the twin: readers, inference, decoding, output, and no torch."""
    checkpoint = make_untrained_checkpoint(tmp_path / "model.pt")
    out = subprocess.run([sys.executable, "-c", CLASSIFY_WITHOUT_TORCH, str(checkpoint), str(J2K_SERIES)],
                         capture_output=True, text=True, timeout=300)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "torch": False}, out.stderr
    (series,) = json.loads(out.stdout)["series"]
    assert series["status"] == "classified" and series["model_version"].endswith("seed0")
