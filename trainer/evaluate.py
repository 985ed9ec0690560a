"""Evaluation with the paper's measures: error, per-class accuracy, one-vs-rest AUC, confusion matrix.

A row's ``region`` may join two classes (``lungs|liver``): the slice shows both and either prediction is
right. Conventions used throughout (also written into the JSON under ``conventions``):

- **error**: fraction of slices whose predicted class (arg max) is not among the row's classes.
- **accuracy per class** c: over the slices whose classes include c, the fraction predicted correctly
  (a ``lungs|liver`` slice counts for both lungs and liver).
- **AUC per class** c: one-vs-rest ROC AUC of p(c), positives = slices whose classes include c; ``null``
  when a class has no positives or no negatives in the set. **mean_auc** averages the defined ones.
- **confusion matrix**: rows = true class, columns = predicted class, in ``classes`` order. The true class
  of a multi-class slice is the predicted one when that is among its classes, else the upper one (lower index).
- the same numbers **per source** (the labels file's folder and the first folder of the row's path,
  e.g. ``extra/png8``), because one large easy source can hide the rest, and **per input kind**
  (``dicom`` full-field DICOM, ``nifti`` full-field HU volumes, ``crop`` partial field-of-view crops,
  ``key8-soft-tissue`` / ``key8-full-range`` / ``key16`` key slices; see ``LabelRow.input_kind``), so
  full-field CT is reported apart from crops and 8-bit images.
- **five-class view** (``five_class``): the paper's five classes (Roth et al. 2015: neck, lungs, liver,
  pelvis, legs), for comparison with it. A model with more classes is folded by :data:`FIVE_CLASS_VIEW`:
  ``head`` into ``neck`` (the paper's neck class held everything above the lungs), ``abdomen`` into
  ``liver`` and ``pelvis`` (its probability split evenly; a slice labelled abdomen counts as right when
  called liver or pelvis). Probabilities of folded classes are added; label sets are mapped the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger("trainer.evaluate")

CONVENTIONS = {
    "error": "fraction of slices whose predicted class is not among the row's classes (a|b: either is right)",
    "accuracy": "per class c, over slices whose classes include c: fraction predicted correctly",
    "auc": "one-vs-rest ROC AUC of p(c); positives = slices whose classes include c; null if undefined",
    "confusion": "rows true, columns predicted; true class of a|b = the prediction if among a, b, else the upper one",
}


#: How a class outside the paper's five folds into them (see the module docstring).
FIVE_CLASS_VIEW: dict[str, tuple[str, ...]] = {"head": ("neck",), "abdomen": ("liver", "pelvis")}


@dataclass
class EvalOutputs:
    """What the model said about a set of rows (inputs to the metrics and the figures)."""

    classes: tuple[str, ...]
    probs: np.ndarray  # (N, K) float32
    label_sets: list[frozenset[int]]  # class indices per slice
    sources: list[str]
    patients: list[str]
    rows: list[Any] = field(default_factory=list)
    unreadable: list[dict[str, Any]] = field(default_factory=list)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if len(self.probs) else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# Metrics (pure functions of probabilities and label sets)


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, score))


def compute_metrics(probs: np.ndarray, label_sets: Sequence[Iterable[int]], classes: Sequence[str],
                    patients: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of predictions ``probs`` (N, K) against ``label_sets`` (class indices per slice).

    Returns a JSON-able dict: n, error, accuracy {class: value|None}, auc {class: value|None}, mean_auc,
    confusion {"classes": [...], "matrix": K x K}, class_counts, and patients_per_class when ``patients``
    is given. See the module docstring for the conventions.
    """
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    sets = [frozenset(int(i) for i in s) for s in label_sets]
    n = len(sets)
    if probs.shape != (n, k):
        raise ValueError(f"compute_metrics: probs has shape {probs.shape}, expected ({n}, {k})")
    for i, s in enumerate(sets):
        if not s or min(s) < 0 or max(s) >= k:
            raise ValueError(f"compute_metrics: slice {i} has label set {sorted(s)} outside 0..{k - 1}")
    pred = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    correct = np.array([int(p) in s for p, s in zip(pred, sets)], dtype=bool)
    member = np.zeros((n, k), dtype=bool)
    for i, s in enumerate(sets):
        member[i, list(s)] = True
    confusion = np.zeros((k, k), dtype=np.int64)
    for p, s in zip(pred, sets):
        true = int(p) if int(p) in s else min(s)  # the upper body part (CLASSES run top to bottom)
        confusion[true, int(p)] += 1
    accuracy: dict[str, float | None] = {}
    auc: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for c, name in enumerate(classes):
        m = member[:, c]
        counts[name] = int(m.sum())
        accuracy[name] = float(correct[m].mean()) if m.any() else None
        auc[name] = _auc(m, probs[:, c]) if n else None
    defined = [v for v in auc.values() if v is not None]
    result: dict[str, Any] = {
        "n": n,
        "error": float(1.0 - correct.mean()) if n else None,
        "errors": int((~correct).sum()),
        "accuracy": accuracy,
        "auc": auc,
        "mean_auc": float(np.mean(defined)) if defined else None,
        "confusion": {"classes": list(classes), "rows": "true", "columns": "predicted",
                      "matrix": confusion.tolist()},
        "class_counts": counts,
    }
    if patients is not None:
        if len(patients) != n:
            raise ValueError(f"compute_metrics: {len(patients)} patients for {n} slices")
        result["patients_per_class"] = {
            name: len({patients[i] for i in range(n) if member[i, c]}) for c, name in enumerate(classes)}
        result["patients"] = len(set(patients))
    return result


def five_class_view(out: EvalOutputs) -> EvalOutputs:
    """``out`` folded into the paper's five classes with :data:`FIVE_CLASS_VIEW` (unchanged if already five)."""
    from dicomnode.classification.model import FIVE_CLASSES

    if tuple(out.classes) == FIVE_CLASSES:
        return out
    fold = np.zeros((len(out.classes), len(FIVE_CLASSES)), dtype=np.float64)
    targets: list[tuple[int, ...]] = []
    for i, c in enumerate(out.classes):
        names = (c,) if c in FIVE_CLASSES else FIVE_CLASS_VIEW.get(c)
        if not names:
            raise ValueError(f"five-class view: class {c!r} has no place among {FIVE_CLASSES}")
        idx = tuple(FIVE_CLASSES.index(n) for n in names)
        fold[i, list(idx)] = 1.0 / len(idx)
        targets.append(idx)
    probs = (np.asarray(out.probs, dtype=np.float64) @ fold).astype(np.float32)
    sets = [frozenset(j for i in s for j in targets[i]) for s in out.label_sets]
    return EvalOutputs(classes=FIVE_CLASSES, probs=probs, label_sets=sets, sources=list(out.sources),
                       patients=list(out.patients), rows=list(out.rows), unreadable=list(out.unreadable))


def _grouped_metrics(out: EvalOutputs, keys: Sequence[str]) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    for key in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == key]
        groups[key] = compute_metrics(out.probs[idx], [out.label_sets[i] for i in idx], out.classes,
                                      [out.patients[i] for i in idx])
    return groups


def metrics_from_outputs(out: EvalOutputs, five_class: bool = True) -> dict[str, Any]:
    """Overall metrics plus the same per source and per input kind, the five-class view (when the model
    has other classes), the conventions and the unreadable rows."""
    result = compute_metrics(out.probs, out.label_sets, out.classes, out.patients)
    result["per_source"] = _grouped_metrics(out, out.sources)
    kinds = [str(getattr(r, "input_kind", "") or "unknown") for r in out.rows]
    if len(kinds) == len(out.label_sets) and kinds:
        result["per_input_kind"] = _grouped_metrics(out, kinds)
    if five_class:
        view = five_class_view(out)
        if view is not out:
            five = metrics_from_outputs(view, five_class=False)
            five.pop("conventions", None)
            five.pop("unreadable", None)
            five["folded"] = {c: list(FIVE_CLASS_VIEW[c]) for c in out.classes if c in FIVE_CLASS_VIEW}
            result["five_class"] = five
    result["conventions"] = CONVENTIONS
    result["unreadable"] = list(out.unreadable)
    return result


# ---------------------------------------------------------------------------------------------------
# Running a model over labelled rows


def row_classes(row: Any, classes: Sequence[str]) -> frozenset[int]:
    """Class indices of a label row (its ``labels``/``classes`` attribute, else its ``region`` split on '|').

    A class the model does not have but that :data:`FIVE_CLASS_VIEW` folds into classes it has (``head``
    for a five-class model) stands for those (the paper's convention). Other names (``other``) are
    dropped; a row with none left raises ``ValueError``.
    """
    names = getattr(row, "labels", None) or getattr(row, "classes", None)
    if names is None:
        names = str(getattr(row, "region")).split("|")
    if isinstance(names, str):
        names = names.split("|")
    mapped: list[str] = []
    for nm in names:
        folded = FIVE_CLASS_VIEW.get(nm, ())
        if nm not in classes and folded and all(f in classes for f in folded):
            mapped += folded
        else:
            mapped.append(nm)
    idx = frozenset(classes.index(nm) for nm in mapped if nm in classes)
    if not idx:
        raise ValueError(f"{_where(row)}: region {getattr(row, 'region', names)!r} names none of {list(classes)}")
    return idx


def row_source(row: Any) -> str:
    """Source group of a row: ``<labels folder>/<first folder of its path>`` (e.g. ``extra/png8``)."""
    labels_file = getattr(row, "labels_file", None)
    if labels_file is None:
        return str(getattr(row, "group", None) or "unknown")
    base = Path(str(labels_file)).resolve().parent
    path = Path(str(getattr(row, "path", "")))
    try:
        parts = (path if path.is_absolute() else base / path).resolve().relative_to(base).parts
    except ValueError:
        parts = ()
    return "/".join((base.name,) + tuple(parts[:1] if len(parts) > 1 else ()))


def _where(row: Any) -> str:
    labels_file = getattr(row, "labels_file", None) or "?"
    line = getattr(row, "line", None)
    return f"{labels_file}:{line}" if line is not None else f"{labels_file} ({getattr(row, 'path', '?')})"


def run_model(model: Any, rows: Sequence[Any], batch_size: int = 64, progress: bool = False) -> EvalOutputs:
    """Load, preprocess and classify every row (in batches); unreadable rows are listed, not fatal.

    The outputs follow the rows sorted by file (``outputs.rows`` gives the order).

    ``model`` is a :class:`dicomnode.classification.model.LoadedModel`; rows come from ``trainer.datasets.read_labels``.
    """
    from dicomnode.classification.imaging.preprocess import preprocess_slice
    from dicomnode.classification.model import predict_proba
    from trainer.datasets import load_image

    classes = tuple(model.classes)
    kept: list[Any] = []
    sets: list[frozenset[int]] = []
    unreadable: list[dict[str, Any]] = []
    probs: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            probs.append(predict_proba(model, np.stack(pending)))
            pending.clear()

    # Rows of one NIfTI volume together, so the volume is read once (load_image keeps the last one).
    rows = sorted(rows, key=lambda r: (str(getattr(r, "path", "")), getattr(r, "slice_index", None) or 0))
    cache: dict = {}
    iterator: Iterable[Any] = rows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(rows, desc="evaluate", unit="slice")
    for row in iterator:
        try:
            label_set = row_classes(row, classes)
        except ValueError as exc:
            unreadable.append({"where": _where(row), "path": str(getattr(row, "path", "")), "error": str(exc)})
            continue
        try:
            hu, spacing = load_image(row, cache)
            x = preprocess_slice(hu, spacing, model.preprocess)
        except Exception as exc:  # a broken file must not end the evaluation; it is reported
            where = _where(row)
            err = str(exc) if where in str(exc) else f"{where}: {exc}"
            log.warning("left out of the evaluation: %s", err)
            unreadable.append({"where": where, "path": str(getattr(row, "path", "")), "error": err})
            continue
        pending.append(x)
        kept.append(row)
        sets.append(label_set)
        if len(pending) >= batch_size:
            flush()
    flush()
    p = np.concatenate(probs) if probs else np.zeros((0, len(classes)), dtype=np.float32)
    return EvalOutputs(classes=classes, probs=p, label_sets=sets, sources=[row_source(r) for r in kept],
                       patients=[str(getattr(r, "patient", "")) for r in kept], rows=kept, unreadable=unreadable)


def evaluate(model: Any, rows: Sequence[Any], batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Metrics of ``model`` over labelled ``rows`` (see the module docstring); adds the model version."""
    out = run_model(model, rows, batch_size=batch_size, progress=progress)
    result = metrics_from_outputs(out)
    result["model_version"] = getattr(model, "version", None)
    return result


def penultimate_features(model: Any, rows: Sequence[Any], batch_size: int = 64) -> np.ndarray:
    """Penultimate-layer features (N, F) of ``rows`` (for the t-SNE figure); rows must be readable."""
    import torch

    from dicomnode.classification.imaging.preprocess import preprocess_batch
    from trainer.datasets import load_image

    feats = []
    net = model.net
    cache: dict = {}
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            x = preprocess_batch([load_image(r, cache) for r in rows[i:i + batch_size]], model.preprocess)
            feats.append(net.features(torch.as_tensor(x, device=model.device)).float().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 0), dtype=np.float32)


def is_not_worse(new: dict[str, Any], current: dict[str, Any], tolerance: float = 0.0) -> bool:
    """True when metrics ``new`` are not worse than ``current`` on the same set.

    Not worse = error no higher than current + ``tolerance`` and mean AUC (where both define it) no lower
    than current - ``tolerance``. The sets must have the same n (a different set is not comparable).
    """
    if new.get("n") != current.get("n"):
        raise ValueError(f"is_not_worse: metrics are over different sets (n={new.get('n')} vs {current.get('n')})")
    if new.get("error") is None or current.get("error") is None:
        raise ValueError("is_not_worse: an empty evaluation set has no error to compare")
    if new["error"] > current["error"] + tolerance:
        return False
    a, b = new.get("mean_auc"), current.get("mean_auc")
    if a is not None and b is not None and a < b - tolerance:
        return False
    return True
