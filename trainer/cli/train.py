"""``dicomnode train``: train the ConvNet on labels.csv files into ``--out`` (model.pt, state.pt,
train_report.json); prints a JSON summary."""

from __future__ import annotations

import argparse
import json
import sys

from dicomnode.config import Config

HELP = "train the ConvNet on labels.csv files"


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Train a model from labels files into ``--out``."""
    from dicomnode.cli import require_extra

    require_extra("train", "nibabel", "PIL")
    from trainer.datasets import LabelsError
    from trainer.train import TrainSettings, train

    net_config = json.loads(args.net_config) if args.net_config else {}
    preprocess = json.loads(args.preprocess) if args.preprocess else {}
    settings = TrainSettings(
        labels=args.labels, out=args.out, epochs=args.epochs, per_class=args.per_class, batch_size=args.batch_size,
        lr=args.lr, val_fraction=args.val_fraction, seed=args.seed, patience=args.patience,
        max_minutes=args.max_minutes, average_last=args.average_last,
        augment=not args.no_augment, field_augment=not args.no_field_augment,
        exclude_sources=list(args.exclude_source or []), deterministic=args.deterministic, dry_run=args.dry_run,
        dry_run_batches=args.dry_run_batches, device=args.device, threads=args.threads,
        skip_unreadable=args.skip_unreadable, resume=args.resume, progress=not args.no_progress,
        net_config=net_config, preprocess=preprocess)
    try:
        report = train(settings)
    except (LabelsError, ValueError, FileNotFoundError) as exc:
        print(f"dicomnode train: {exc}", file=sys.stderr)
        return 2
    val = report.get("validation") or {}
    summary = {"out": args.out, "version": report.get("version"), "best_epoch": report.get("best_epoch"),
               "averaged_epochs": report.get("averaged_epochs"),
               "val_error": val.get("error"), "val_balanced_error": val.get("balanced_error"),
               "val_per_class_error": {c: v["error"] for c, v in (val.get("per_class") or {}).items()},
               "train_class_counts": report["data"]["train"]["class_counts"],
               "train_patients_per_class": report["data"]["train"]["patients_per_class"]}
    print(json.dumps(summary, indent=2))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", action="append", required=True, metavar="CSV",
                   help="labels file (labels.csv layout); repeat for several")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (model.pt, state.pt, train_report.json)")
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs (default 40)")
    p.add_argument("--per-class", type=int, default=300, help="slices drawn per class per epoch (default 300)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="patients held out for validation (default 0.2); 0 trains on every patient for exactly "
                        "--epochs epochs (no early stopping) and keeps the last epoch")
    p.add_argument("--patience", type=int, default=8, help="early stopping: epochs without improvement")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="time budget: the learning rate anneals within it and training stops at it (0: none)")
    p.add_argument("--average-last", type=int, default=0, metavar="N",
                   help="the model is the weight average of the last N epochs, BatchNorm statistics recomputed "
                        "(0: the best epoch on the validation split, or the last one with --val-fraction 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="ask torch for deterministic kernels")
    p.add_argument("--no-augment", action="store_true", help="no translation/rotation/TPS augmentation")
    p.add_argument("--exclude-source", action="append", metavar="SOURCE",
                   help="leave out the rows of a source (labels folder / subfolders, e.g. extra/nifti/ibsi_sts or "
                        "volumes) entirely: for cross-source figures (train without it, test on it); repeatable")
    p.add_argument("--no-field-augment", action="store_true",
                   help="no field-of-view crops, left-right flips or 8-bit quantisation (trainer.augment.FieldParams)")
    p.add_argument("--dry-run", action="store_true", help="one epoch of a few batches (checks data and code)")
    p.add_argument("--dry-run-batches", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out rows whose image cannot be read (listed) instead of refusing to train")
    p.add_argument("--resume", action="store_true", help="continue the training state in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--net-config", metavar="JSON", help="net config overrides, e.g. '{\"widths\": [16,32,64,64,128]}'")
    p.add_argument("--preprocess", metavar="JSON", help="preprocessing overrides, e.g. '{\"size\": 128}'")
