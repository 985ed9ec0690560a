"""``dicomnode evaluate``: evaluate a model on labelled slices: n, error, accuracy and one-vs-rest AUC
per class, the confusion matrix, the same per source and input kind, the five-class view; ``--figures``
writes the paper's figures; ``--series`` evaluates labelled NIfTI volumes as whole DICOM series.

Heavy imports (torch, sklearn, matplotlib) happen inside :func:`run` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dicomnode.config import Config

log = logging.getLogger("trainer.cli.evaluate")

HELP = "evaluate a model on labelled slices (error, accuracy, AUC, confusion)"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Evaluate a model on labels files; print a summary or ``--json``; optionally write the figures."""
    from dicomnode.cli import require_extra

    require_extra("evaluate", "sklearn", "nibabel", "PIL")
    from dicomnode.classification.model import load_model
    from trainer.datasets import LabelsError
    from trainer.evaluate import metrics_from_outputs, run_model

    try:
        model = load_model(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dicomnode evaluate: {exc}", file=sys.stderr)
        return 2
    try:
        rows = select_rows(model, args.labels or [], args.split)
        excluded = 0
        if args.exclude_training_patients:
            seen = {r.patient for r in select_rows(model, [], "train")}
            excluded = sum(r.patient in seen for r in rows)
            rows = [r for r in rows if r.patient not in seen]
    except (LabelsError, ValueError) as exc:
        print(f"dicomnode evaluate: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("dicomnode evaluate: the labels files have no slice in the model's classes", file=sys.stderr)
        return 2
    if args.series:
        return run_series(model, rows, args)
    outputs = run_model(model, rows, batch_size=args.batch_size, progress=not args.json and sys.stderr.isatty())
    if not outputs.rows:
        print(f"dicomnode evaluate: none of the {len(rows)} slice(s) could be read", file=sys.stderr)
        for item in outputs.unreadable[:20]:
            print(f"  {item['error']}", file=sys.stderr)
        return 1
    metrics = metrics_from_outputs(outputs)
    metrics["model_version"] = model.version
    metrics["model_path"] = str(model.path) if model.path else None
    metrics["labels"] = [str(r) for r in sorted({str(row.labels_file) for row in rows})]
    metrics["split"] = args.split
    if args.exclude_training_patients:
        metrics["excluded_training_patient_slices"] = excluded
    if args.figures:
        from trainer.figures import write_all

        metrics["figures"] = write_all(model, outputs, metrics, args.figures)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_summary(metrics))
    if metrics["unreadable"]:
        print(f"dicomnode evaluate: {len(metrics['unreadable'])} slice(s) could not be read:", file=sys.stderr)
        for item in metrics["unreadable"][:20]:
            print(f"  {item['error']}", file=sys.stderr)
        return 1
    return 0


def run_series(model, rows: list, args: argparse.Namespace) -> int:
    """``--series``: the NIfTI volumes of ``rows`` as DICOM series through the node's pipeline."""
    from trainer.series_eval import evaluate_series, format_series_summary

    try:
        result = evaluate_series(model, rows, limit=args.series_limit,
                                 progress=not args.json and sys.stderr.isatty())
    except ValueError as exc:
        print(f"dicomnode evaluate: {exc}", file=sys.stderr)
        return 2
    result["model_version"] = model.version
    result["split"] = args.split
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {model.version}  series evaluation ({args.split})")
        print(format_series_summary(result))
    if result["failed"]:
        print(f"dicomnode evaluate: {len(result['failed'])} volume(s) could not be evaluated", file=sys.stderr)
        return 1
    return 0


def select_rows(model, labels: list[str], split: str) -> list:
    """Rows of ``labels``; with ``split`` validation/train, the model's own patient-level split of them.

    The split is rebuilt from the training settings stored in the checkpoint (labels files, val_fraction,
    seed) with :func:`trainer.datasets.split_by_patient`; without ``labels`` the training's labels files
    are used. ``ValueError`` when the checkpoint has no training record or the rebuilt split does not
    have the size the training reported (the labels files changed since).
    """
    from trainer.datasets import read_many, split_by_patient

    if split == "all":
        if not labels:
            raise ValueError("--labels is required (or --split validation to use the model's own held-out patients)")
        return read_many(labels)
    training = (model.extra or {}).get("training") or {}
    settings = training.get("settings") or {}
    if "val_fraction" not in settings or "seed" not in settings:
        raise ValueError(f"model {model.version} has no training record (val_fraction, seed): use --split all")
    if split == "validation" and float(settings["val_fraction"]) == 0.0:
        raise ValueError(f"model {model.version} was trained on every patient of its labels files (val_fraction 0): "
                         "it has no validation split; evaluate it on labels it was not trained on (--split all)")
    files = labels or settings.get("labels") or []
    if not files:
        raise ValueError(f"model {model.version}: no labels files given and none recorded in the checkpoint")
    rows = read_many(files)
    # The training left out the rows it could not read before splitting: do the same.
    left_out = (training.get("data") or {}).get("left_out_unreadable") or []
    bad = {str(p).split(": cannot read", 1)[0] for p in left_out}
    rows = [r for r in rows if r.where not in bad]
    train_rows, val_rows = split_by_patient(rows, float(settings["val_fraction"]), int(settings["seed"]))
    chosen = val_rows if split == "validation" else train_rows
    recorded = ((training.get("data") or {}).get(split) or {}).get("slices")
    if recorded is not None and recorded != len(chosen):
        raise ValueError(f"the rebuilt {split} split has {len(chosen)} slices but the training recorded {recorded}: "
                         "pass the same --labels files the model was trained on")
    return chosen


def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_summary(metrics: dict) -> str:
    """Human-readable summary of an evaluation."""
    cls = metrics["confusion"]["classes"]
    lines = [f"model {metrics.get('model_version')}  slices {metrics['n']}  patients {metrics.get('patients', '-')}  "
             f"error {_f(metrics['error'])}  mean AUC {_f(metrics['mean_auc'])}",
             f"{'class':<8}{'slices':>8}{'patients':>10}{'accuracy':>10}{'AUC':>8}"]
    for c in cls:
        lines.append(f"{c:<8}{metrics['class_counts'][c]:>8}{metrics['patients_per_class'][c]:>10}"
                     f"{_f(metrics['accuracy'][c], 3):>10}{_f(metrics['auc'][c], 3):>8}")
    lines.append("confusion (rows true, columns predicted): " + " ".join(cls))
    for c, row in zip(cls, metrics["confusion"]["matrix"]):
        lines.append(f"  {c:<8}" + "".join(f"{v:>7}" for v in row))
    lines.append("per source:")
    for src, m in metrics["per_source"].items():
        lines.append(f"  {src:<20} slices {m['n']:>6}  patients {m.get('patients', '-'):>4}  error {_f(m['error'])}  "
                     f"mean AUC {_f(m['mean_auc'])}")
    if metrics.get("per_input_kind"):
        lines.append("per input kind:")
        for kind, m in metrics["per_input_kind"].items():
            lines.append(f"  {kind:<20} slices {m['n']:>6}  patients {m.get('patients', '-'):>4}  "
                         f"error {_f(m['error'])}  mean AUC {_f(m['mean_auc'])}")
    five = metrics.get("five_class")
    if five:
        folded = ", ".join(f"{c} -> {'/'.join(t)}" for c, t in five["folded"].items())
        lines.append(f"five-class view ({folded}): error {_f(five['error'])}  mean AUC {_f(five['mean_auc'])}")
    if metrics.get("figures"):
        lines.append("figures: " + ", ".join(metrics["figures"].values()))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR_OR_FILE", default=None,
                   help="checkpoint or run directory (default: the shipped default model)")
    p.add_argument("--labels", metavar="CSV", action="append",
                   help="labels.csv (layout of ../shared/data/*/labels.csv); repeatable")
    p.add_argument("--split", choices=["all", "validation", "train"], default="all",
                   help="all rows (default), or the model's own patient-level validation/train split of the "
                        "labels (rebuilt from the checkpoint; default labels: those it was trained on)")
    p.add_argument("--exclude-training-patients", action="store_true",
                   help="leave out slices of patients in the model's training split (rebuilt from the checkpoint)")
    p.add_argument("--series", action="store_true",
                   help="whole-series evaluation: each labelled NIfTI volume becomes a DICOM series run through "
                        "the node's pipeline (ordering, preprocessing, ordered decoding); slice error and "
                        "boundary error in mm (trainer.series_eval)")
    p.add_argument("--series-limit", type=int, default=0, metavar="N",
                   help="with --series: evaluate only the first N volumes (0: all)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--figures", metavar="DIR", help="write confusion, ROC, filters, t-SNE and TPS figures here")
    p.add_argument("--batch-size", type=int, default=64, help="slices per inference batch (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
