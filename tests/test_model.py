"""The ConvNet and its checkpoints: rebuild from the file alone, CPU inference, the shipped default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dicomnode.classification.model.checkpoint as ckpt
from dicomnode.classification.imaging.pixels import read_hu
from dicomnode.classification.imaging.preprocess import PreprocessParams, preprocess_batch
from dicomnode.classification.model import (
    BODY_PARTS,
    CLASSES,
    build_net,
    load_model,
    make_untrained_checkpoint,
    predict_proba,
    save_checkpoint,
)
from tests.conftest import CT_FIXTURES


def test_classes_and_body_parts():
    assert CLASSES == ("head", "neck", "lungs", "liver", "pelvis", "legs")
    assert BODY_PARTS == {"head": "HEAD", "neck": "NECK", "lungs": "LUNG", "liver": "LIVER", "abdomen": "ABDOMEN",
                          "pelvis": "PELVIS", "legs": "LEG"}


def test_build_net_shapes_features_first_conv():
    net = build_net({"widths": [4, 8, 8, 8, 8], "input_size": 64, "fc": [12]}).eval()
    x = torch.rand(2, 3, 64, 64)
    assert net(x).shape == (2, 6)
    assert net.features(x).shape == (2, 12)
    assert net.first_conv.shape == (4, 3, 5, 5)
    strided = build_net({"widths": [4, 8, 8, 8, 8], "strides": [2, 1, 1, 1, 1], "pools": [1, 2, 2, 2, 2],
                         "input_size": 64})
    assert strided(x).shape == (2, 6)


@pytest.mark.parametrize("bad, match", [
    ({"widths": [4, 4]}, "kernels"),
    ({"colour": 1}, "unknown keys"),
    ({"input_size": 8}, "too small"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_net_config(bad, match):
    with pytest.raises(ValueError, match=match):
        build_net(bad)


def test_checkpoint_round_trip_rebuilds_same_outputs(tmp_path):
    torch.manual_seed(3)
    p = PreprocessParams(size=64, pixel_mm=6.4)
    cfg = {"widths": [4, 8, 8, 8, 8], "input_size": 64, "fc": [16]}
    net = build_net(cfg)
    # train-mode statistics must travel too: touch the BatchNorm running stats
    net.train()
    net(torch.rand(8, 3, 64, 64))
    net.eval()
    path = save_checkpoint(tmp_path / "m.pt", net, cfg, p, "v-test", extra={"note": "x", "n": [1, 2]})
    hu, spacing = read_hu(CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm")
    x = preprocess_batch([(hu, spacing)] * 2, p)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    del net
    m = load_model(path, device="cpu")
    assert m.version == "v-test" and m.classes == CLASSES and m.preprocess == p
    assert m.extra == {"note": "x", "n": [1, 2]} and not m.net.training
    got = predict_proba(m, x)
    assert got.dtype == np.float32 and got.shape == (2, 6)
    assert np.allclose(got, expected, atol=1e-6)
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)
    # a directory is read as <dir>/model.pt
    save_checkpoint(tmp_path / "run", m.net, cfg, p, "v-dir")
    assert load_model(tmp_path / "run", device="cpu").version == "v-dir"


def test_untrained_model_runs_on_cpu_without_cuda(tmp_path):
    path = make_untrained_checkpoint(tmp_path / "u.pt", seed=1)
    m = load_model(path, device="cpu")
    assert "untrained-test-model" in m.version and m.device.type == "cpu"
    x = np.random.default_rng(0).random((5, m.preprocess.channels, m.preprocess.size, m.preprocess.size),
                                        dtype=np.float32)
    p1 = predict_proba(m, x, batch_size=2)
    assert p1.shape == (5, 6) and np.allclose(p1, predict_proba(m, torch.from_numpy(x)), atol=1e-6)
    with pytest.raises(ValueError, match="N, C, S, S"):
        predict_proba(m, x[0])


def test_bad_checkpoints_are_named(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(junk)
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dicomnode checkpoint"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")


def test_no_default_model_is_a_clear_error(tmp_path, monkeypatch):
    import dicomnode.classification.model.files as model_files

    monkeypatch.setattr(model_files, "DEFAULT_MODEL_DIR", tmp_path / "default")
    with pytest.raises(FileNotFoundError, match="no default model is shipped"):
        load_model(None)


def test_shipped_default_model_loads_and_is_not_a_placeholder():
    if not (ckpt.DEFAULT_MODEL_DIR / ckpt.CHECKPOINT_NAME).exists():
        pytest.skip("no default model shipped yet")
    m = load_model(None, device="cpu")
    assert "untrained" not in m.version
    assert m.classes == CLASSES
    assert (ckpt.DEFAULT_MODEL_DIR / ckpt.CHECKPOINT_NAME).stat().st_size < 8 * 1024 * 1024


def test_five_class_checkpoint_loads_and_class_order_is_checked(tmp_path):
    from dicomnode.classification.model import FIVE_CLASSES

    p = PreprocessParams(size=64, pixel_mm=6.4)
    cfg = {"in_channels": 3, "input_size": 64, "num_classes": 5, "widths": [4, 8, 8, 8, 8], "fc": [8]}
    old = save_checkpoint(tmp_path / "five", build_net(cfg), cfg, p, "five", classes=FIVE_CLASSES)
    m = load_model(old, device="cpu")
    assert m.classes == FIVE_CLASSES and m.net.config["num_classes"] == 5
    bad = save_checkpoint(tmp_path / "bad", build_net(cfg), cfg, p, "bad",
                          classes=("lungs", "neck", "liver", "pelvis", "legs"))
    with pytest.raises(ValueError, match="anatomical order"):
        load_model(bad, device="cpu")


def test_node_model_path_prefers_config_then_promoted_then_shipped(tmp_path):
    from dicomnode.classification.model import node_model_path

    assert node_model_path("", tmp_path) == ckpt.checkpoint_path(None)
    promoted = tmp_path / "models" / "model.pt"
    promoted.parent.mkdir()
    promoted.write_bytes(b"x")
    assert node_model_path("", tmp_path) == promoted
    assert node_model_path(None, tmp_path) == promoted
    own = tmp_path / "own.pt"
    assert node_model_path(str(own), tmp_path) == own


def test_the_inference_copy_gives_the_nets_probabilities():
    """predict_proba runs a fused (BatchNorm folded), channels-last copy: same outputs as the trained net."""
    import numpy as np
    import torch

    from dicomnode.classification.model import load_model, predict_proba

    model = load_model(None, "cpu")
    assert model.inference_net is not None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.inference_net.modules())
    x = np.random.default_rng(0).random((5, model.preprocess.channels, model.preprocess.size,
                                         model.preprocess.size), dtype=np.float32)
    with torch.inference_mode():
        expected = torch.softmax(model.net(torch.from_numpy(x)), dim=1).numpy()
    assert np.allclose(predict_proba(model, x), expected, atol=1e-5)
    # the trained net itself is untouched (the trainer reads its layers)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.net.modules())


def test_read_preprocess_takes_the_checkpoints_preprocessing_without_running_its_pickle(tmp_path):
    """The reader processes of ``dicomnode classify`` get the preprocessing before torch is imported."""
    import pickle
    import zipfile

    from dicomnode.classification.model import read_preprocess

    path = ckpt.make_untrained_checkpoint(tmp_path / "m.pt")
    assert read_preprocess(path) == load_model(path, "cpu").preprocess == PreprocessParams(size=64, pixel_mm=6.4)
    assert read_preprocess(None) == load_model(None, "cpu").preprocess  # the shipped model
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    assert read_preprocess(tmp_path / "junk.pt") is None  # load_model then says what is wrong
    assert read_preprocess(tmp_path / "missing.pt") is None

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"preprocess": Boom()}))
    assert read_preprocess(evil) is None  # builtins.print is not an allowed class: nothing is executed
