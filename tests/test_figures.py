"""Figures: filter mosaics, t-SNE subsampling, files written by each plot."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.classification.model import build_net
from trainer.figures import (filter_mosaic, plot_confusion, plot_filters, plot_roc, plot_tsne,
                             subsample_per_label)


def test_filter_mosaic_tiles_every_filter_scaled():
    net = build_net({"widths": [6, 8, 8, 8, 8], "kernels": [5, 3, 3, 3, 3]})
    w = net.first_conv.detach().numpy()
    m = filter_mosaic(w, 1)
    assert m.shape == (2 * 6 - 1, 3 * 6 - 1)  # 6 filters of 5x5 in a 2x3 grid with 1-pixel gaps
    first = m[:5, :5]
    f = w[0, 1]
    assert np.allclose(first, (f - f.min()) / (f.max() - f.min()))
    assert np.isnan(m[5]).all()


def test_subsample_per_label_spreads_over_labels():
    labels = ["a"] * 100 + ["b"] * 5 + ["c"] * 50
    idx = subsample_per_label(labels, 30, seed=1)
    picked = [labels[i] for i in idx]
    assert picked.count("b") == 5 and picked.count("a") == 10 and picked.count("c") == 10
    assert idx == subsample_per_label(labels, 30, seed=1)


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=40)
    sets = [frozenset({i % 3}) for i in range(40)]
    for path in (plot_confusion([[3, 1, 0], [0, 2, 0], [1, 0, 4]], ["a", "b", "c"], tmp_path / "c.png"),
                 plot_roc(probs, sets, ["a", "b", "c"], tmp_path / "r.png"),
                 plot_filters(build_net({}).first_conv, tmp_path / "f.png"),
                 plot_tsne(rng.normal(size=(40, 8)) + np.repeat(np.eye(8)[:4] * 5, 10, axis=0),
                           ["x", "y", "z", "w"] * 10, tmp_path / "t.png")):
        assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least 5"):
        plot_tsne(np.zeros((3, 2)), ["a"] * 3, tmp_path / "x.png")
