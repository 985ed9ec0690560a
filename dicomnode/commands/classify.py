"""``dicomnode classify PATHS...``: classify CT series offline (no network, no database).

Prints a table of region ranges per series, or with ``--json`` the document of
:func:`dicomnode.classification.pipeline.results_to_json`, to stdout; logs go to stderr. ``--plot FILE.png`` draws, per
series, the five probabilities along z beside a coronal reformat (the paper's Fig. 7); with several series
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

from dicomnode.logconfig import setup_logging

log = logging.getLogger("dicomnode.commands.classify")

COLOURS = {"neck": "tab:purple", "lungs": "tab:blue", "liver": "tab:red", "pelvis": "tab:green", "legs": "tab:orange"}


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


def plot_profile(result, path: Path) -> Path:
    """Write the probability profile beside the coronal reformat of ``result`` (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(result.slices)
    z = np.array([s.z_mm if s.z_mm is not None else -float(s.position) for s in result.slices], dtype=float)
    fig, (ax_img, ax_p) = plt.subplots(1, 2, figsize=(10, 7), sharey=True, gridspec_kw={"width_ratios": [1, 1.2]})
    if result.coronal is not None and n:
        ax_img.imshow(result.coronal, cmap="gray", vmin=-1000, vmax=600, aspect="auto",
                      extent=[0, result.coronal.shape[1], z[-1], z[0]] if n > 1 else None)
    ax_img.set_title("coronal reformat (W1600/L-200)")
    ax_img.set_xticks([])
    ax_img.set_ylabel("z (mm)" if result.slices and result.slices[0].z_mm is not None else "slice")
    for cls, colour in COLOURS.items():
        p = [s.probabilities.get(cls, 0.0) for s in result.slices]
        ax_p.plot(p, z, color=colour, label=cls, lw=1.5)
    for g in result.regions:
        colour = COLOURS.get(g.region, "grey")
        ax_p.axhspan(z[g.first_position], z[g.last_position], color=colour, alpha=0.12)
        ax_p.text(0.98, (z[g.first_position] + z[g.last_position]) / 2, g.region, color=colour, va="center", ha="right",
                  fontsize=9, transform=ax_p.get_yaxis_transform())
    ax_p.set_xlim(0, 1)
    ax_p.set_xlabel("probability")
    ax_p.set_title("ConvNet probabilities along z")
    ax_p.legend(loc="lower right", fontsize=8)
    if n > 1 and z[0] < z[-1]:
        ax_p.invert_yaxis()
    fig.suptitle(f"series ...{result.series_instance_uid[-24:]}  ({n} slices, model {result.model_version})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_path(base: Path, i: int) -> Path:
    return base if i == 0 else base.with_name(f"{base.stem}-{i + 1}{base.suffix}")


def cmd_classify(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from dicomnode.classification.pipeline import classify_paths, configure_torch, results_to_json
    from dicomnode.classification.model import load_model

    try:
        model = load_model(args.model or None, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dicomnode classify: {exc}", file=sys.stderr)
        return 2
    configure_torch(args.threads)
    try:
        results, problems = classify_paths(args.paths, model, min_slices=args.min_slices, batch_size=args.batch_size,
                                           keep_coronal=bool(args.plot))
    except ValueError as exc:  # a path that does not exist
        print(f"dicomnode classify: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        log.warning("ignored %s", problem)
    if args.json:
        json.dump(results_to_json(results, with_slices=not args.no_slices), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(results))
    if args.plot:
        plotted = [r for r in results if r.status == "classified"]
        for i, r in enumerate(plotted):
            out = plot_profile(r, _plot_path(Path(args.plot), i))
            log.info("wrote %s", out)
    if not results:
        print("dicomnode classify: no DICOM series found", file=sys.stderr)
        return 1
    return 1 if any(r.status == "failed" for r in results) else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify CT series offline (no network, no database)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="print JSON to stdout instead of a table")
    p.add_argument("--no-slices", action="store_true", help="with --json: leave out the per-slice list")
    p.add_argument("--plot", metavar="FILE.png", help="write the probability profile beside a coronal reformat")
    p.add_argument("--model", metavar="FILE", help="model checkpoint (default: the shipped model)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="slices per inference batch (default 32)")
    p.add_argument("--min-slices", type=int, default=1, metavar="N",
                   help="skip series with fewer slices (default 1; the node uses worker.min_slices)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level on stderr (default WARNING)")
    p.set_defaults(func=cmd_classify)
