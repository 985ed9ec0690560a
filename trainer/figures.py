"""Figures of an evaluation: confusion matrix, ROC curves, first-layer filters (paper Fig. 2), t-SNE (Fig. 6).

Every function writes one PNG with matplotlib's Agg backend and returns its path; :func:`write_all`
makes the whole set for a model and an evaluation (plus the TPS figure of :mod:`trainer.augment`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("trainer.figures")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return out


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], out_path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Confusion matrix (rows true, columns predicted) with counts and row-normalised shading."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _save(fig, out_path)


def plot_roc(probs: np.ndarray, label_sets: Sequence[frozenset[int]], classes: Sequence[str],
             out_path: str | Path, title: str = "ROC, one vs rest") -> Path:
    """One-vs-rest ROC curve per class (positives = slices whose classes include it) with its AUC; the right
    panel zooms on the top-left corner, where good models differ."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.4))
    for c, name in enumerate(classes):
        y = np.array([c in s for s in label_sets], dtype=bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, c])
        label = f"{name} (AUC {roc_auc_score(y, probs[:, c]):.4f}, n={int(y.sum())})"
        for ax in axes:
            ax.plot(fpr, tpr, label=label)
    axes[0].plot([0, 1], [0, 1], color="grey", linewidth=0.7, linestyle=":")
    axes[1].set_xlim(-0.002, 0.1)
    axes[1].set_ylim(0.8, 1.005)
    axes[1].set_title("zoom", fontsize=9)
    for ax in axes:
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    axes[0].set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="lower right")
    return _save(fig, out_path)


def filter_mosaic(w: np.ndarray, channel: int) -> np.ndarray:
    """The filters of one input channel tiled in a near-square grid, each scaled to 0..1, NaN gaps."""
    n_out, _, k, _ = w.shape
    cols = int(np.ceil(np.sqrt(n_out)))
    rows = int(np.ceil(n_out / cols))
    mosaic = np.full((rows * (k + 1) - 1, cols * (k + 1) - 1), np.nan)
    for i in range(n_out):
        f = w[i, channel]
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        r, c = divmod(i, cols)
        mosaic[r * (k + 1):r * (k + 1) + k, c * (k + 1):c * (k + 1) + k] = f
    return mosaic


def plot_filters(weights: Any, out_path: str | Path, channel_names: Sequence[str] | None = None,
                 title: str = "first-layer filters") -> Path:
    """The first conv layer's filters (out, in, k, k): one mosaic per input channel, each filter scaled to
    its own range (paper Fig. 2)."""
    plt = _plt()
    w = np.asarray(weights.detach().cpu().numpy() if hasattr(weights, "detach") else weights, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"plot_filters: expected (out, in, k, k) weights, got shape {w.shape}")
    n_in = w.shape[1]
    fig, axes = plt.subplots(1, n_in, figsize=(2.6 * n_in + 0.4, 2.9), squeeze=False)
    for j in range(n_in):
        ax = axes[0][j]
        cmap = plt.get_cmap("gray").with_extremes(bad="white")
        ax.imshow(np.ma.masked_invalid(filter_mosaic(w, j)), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        name = channel_names[j] if channel_names and j < len(channel_names) else f"channel {j}"
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{title} ({w.shape[0]} filters, {w.shape[2]}x{w.shape[3]})", fontsize=9)
    return _save(fig, out_path)


def plot_tsne(features: np.ndarray, labels: Sequence[str], out_path: str | Path, seed: int = 0,
              title: str = "t-SNE of penultimate features") -> Path:
    """2-D t-SNE of ``features`` (N, F) coloured by label (paper Fig. 6)."""
    from sklearn.manifold import TSNE

    plt = _plt()
    feats = np.asarray(features, dtype=np.float32)
    n = feats.shape[0]
    if n < 5:
        raise ValueError(f"plot_tsne: need at least 5 samples, got {n}")
    emb = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca",
               random_state=seed).fit_transform(feats)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name in sorted(set(labels), key=lambda s: (s.count("|"), s)):
        idx = [i for i, lab in enumerate(labels) if lab == name]
        ax.scatter(emb[idx, 0], emb[idx, 1], s=8, label=f"{name} ({len(idx)})", alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return _save(fig, out_path)


def subsample_per_label(labels: Sequence[str], max_total: int, seed: int = 0) -> list[int]:
    """Indices of at most ``max_total`` items, spread over the labels (each label gets an equal share)."""
    rng = np.random.default_rng(seed)
    by: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    share = max(1, max_total // max(1, len(by)))
    chosen: list[int] = []
    for lab in sorted(by):
        idx = by[lab]
        chosen.extend(idx if len(idx) <= share else rng.choice(idx, share, replace=False).tolist())
    return sorted(chosen)


def write_all(model: Any, outputs: Any, metrics: dict[str, Any], out_dir: str | Path, tsne_max: int = 600,
              seed: int = 0) -> dict[str, str]:
    """All figures of ``model`` on an evaluation (``outputs`` from :func:`trainer.evaluate.run_model`).

    Returns {figure name: path}. The t-SNE uses at most ``tsne_max`` slices spread over the labels; the
    TPS figure deforms an evaluated liver slice (else the first).
    """
    from dicomnode.classification.imaging.preprocess import preprocess_batch
    from trainer.augment import plot_deformations
    from trainer.datasets import load_image
    from trainer.evaluate import penultimate_features

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(outputs.classes)
    written: dict[str, str] = {}
    conf = metrics["confusion"]
    written["confusion"] = str(plot_confusion(conf["matrix"], conf["classes"], out / "confusion.png",
                                              title=f"confusion matrix (n={metrics['n']}, error {metrics['error']:.3f})"
                                              if metrics.get("error") is not None else "confusion matrix"))
    written["roc"] = str(plot_roc(outputs.probs, outputs.label_sets, classes, out / "roc.png"))
    windows = [f"window {lo:g}..{hi:g} HU" for lo, hi in model.preprocess.windows]
    written["filters"] = str(plot_filters(model.net.first_conv, out / "filters.png", channel_names=windows))
    labels = ["|".join(classes[i] for i in sorted(s)) for s in outputs.label_sets]
    if len(outputs.rows) >= 5:
        idx = subsample_per_label(labels, tsne_max, seed)
        feats = penultimate_features(model, [outputs.rows[i] for i in idx])
        written["tsne"] = str(plot_tsne(feats, [labels[i] for i in idx], out / "tsne.png", seed=seed))
        # An abdominal slice shows the deformation best; else the first one.
        pick = next((r for r in outputs.rows if "liver" in getattr(r, "classes", ())), outputs.rows[0])
        first = preprocess_batch([load_image(pick)], model.preprocess)[0]
        written["tps"] = str(plot_deformations(first, out / "tps_deformations.png", seed=seed))
    else:
        log.warning("fewer than 5 readable slices: no t-SNE or TPS figure")
    return written
