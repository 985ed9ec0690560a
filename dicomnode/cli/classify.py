"""``dicomnode classify PATHS...``: classify CT series offline (no network, no database).

Prints a table of region ranges per series, or with ``--json`` the document of
:func:`dicomnode.classification.pipeline.results_to_json`, to stdout; logs go to stderr. ``--plot FILE.png`` draws, per
series, the class probabilities along z beside a coronal reformat (the paper's Fig. 7); with several series
the second and later get ``-2``, ``-3``, ... before the extension.
Exit status: 0 when every series was classified or skipped, 1 when one failed or none was found,
2 when the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dicomnode.config import Config

log = logging.getLogger("dicomnode.cli.classify")

HELP = "classify CT series offline (no network, no database)"


def format_table(results) -> str:
    """Human-readable summary: one block per series."""
    lines = []
    for r in results:
        head = f"series {r.series_instance_uid}  {r.n_slices} slice(s)  {r.status}"
        if r.status == "classified":
            head += f"  model {r.model_version}  ordered by {r.order_source.replace('_', ' ')}"
        lines.append(head)
        if r.reason:
            lines.append(f"  reason: {r.reason}")
        for note in r.notes:
            lines.append(f"  note: {note}")
        if r.regions:
            lines.append(f"  {'region':<8}{'slices':>10}{'count':>7}{'instances':>13}{'z from (mm)':>13}"
                         f"{'z to (mm)':>11}{'mean p':>8}")
            for g in r.regions:
                inst = f"{g.first_instance}-{g.last_instance}"
                z0 = "" if g.z_start_mm is None else f"{g.z_start_mm:.1f}"
                z1 = "" if g.z_end_mm is None else f"{g.z_end_mm:.1f}"
                lines.append(f"  {g.region:<8}{f'{g.first_position}-{g.last_position}':>10}{g.n_slices:>7}{inst:>13}"
                             f"{z0:>13}{z1:>11}{g.mean_probability:>8.3f}")
        lines.append("")
    return "\n".join(lines)


def _plot_path(base: Path, i: int) -> Path:
    return base if i == 0 else base.with_name(f"{base.stem}-{i + 1}{base.suffix}")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomnode.classification.imaging.series import iter_files
    from dicomnode.classification.model import node_model_path, read_preprocess
    from dicomnode.classification.pipeline import FileScan, classify_paths, results_to_json

    # the model the node would use: model.path, else the one `promote` installed, else the shipped one
    model_path = node_model_path(cfg.model.path, cfg.resolved_data_dir)
    try:
        files = list(iter_files(args.paths))
    except ValueError as exc:  # a path that does not exist
        print(f"dicomnode classify: {exc}", file=sys.stderr)
        return 1
    # Reading starts before the model is loaded (onnxruntime, or torch's ~2 s import): reader processes
    # decode and preprocess with the checkpoint's preprocessing while this process loads the model.
    params = read_preprocess(model_path)
    scan = FileScan(files, params, cfg.worker.batch_size, keep_coronal=bool(args.plot)) if params else None
    try:
        from dicomnode.classification.model import load_inference_model

        try:
            model = load_inference_model(model_path, cfg.worker.device, args.threads)
        except (FileNotFoundError, ValueError) as exc:
            print(f"dicomnode classify: {exc}", file=sys.stderr)
            return 2
        results, problems = classify_paths(files, model, min_slices=args.min_slices, batch_size=cfg.worker.batch_size,
                                           keep_coronal=bool(args.plot), scan=scan)
    finally:
        if scan is not None:
            scan.close()
    for problem in problems:
        log.warning("ignored %s", problem)
    if args.json:
        json.dump(results_to_json(results, with_slices=not args.no_slices), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(results))
    if args.plot:
        from dicomnode.classification.plot import plot_profile

        plotted = [r for r in results if r.status == "classified"]
        for i, r in enumerate(plotted):
            out = plot_profile(r, _plot_path(Path(args.plot), i))
            log.info("wrote %s", out)
    if not results:
        print("dicomnode classify: no DICOM series found", file=sys.stderr)
        return 1
    return 1 if any(r.status == "failed" for r in results) else 0


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"model.path": args.model, "worker.batch_size": args.batch_size, "worker.device": args.device}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="print JSON to stdout instead of a table")
    p.add_argument("--no-slices", action="store_true", help="with --json: leave out the per-slice list")
    p.add_argument("--plot", metavar="FILE.png", help="write the probability profile beside a coronal reformat")
    p.add_argument("--model", metavar="FILE", help="model checkpoint (overrides model.path; default: the shipped model)")
    p.add_argument("--batch-size", type=int, metavar="N", help="slices per inference batch (overrides worker.batch_size)")
    p.add_argument("--min-slices", type=int, default=1, metavar="N",
                   help="skip series with fewer slices (default 1; the node uses worker.min_slices)")
    p.add_argument("--device", help="auto (CUDA when an NVIDIA GPU is visible, else the CPU), cpu or cuda[:N] "
                   "(overrides worker.device)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (default: one per core)")
