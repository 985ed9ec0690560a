"""The model card: Markdown for people, JSON for tools, written side by side next to a model.

It records what the model rests on (data sources, class counts and patients per class, the split),
how good it is (the evaluations, overall and per source, with and without augmentation as in the
paper's Table 1) and what it cannot do (limits). Numbers come from evaluation dicts of
:func:`trainer.evaluate.evaluate`; nothing here computes or invents a figure.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

DEFAULT_LIMITS = [
    "Legs are scarce in the public data: no whole-cross-section leg slices; the leg slices are one-leg or "
    "one-hip crops around a tumour (TCIA Soft-tissue-Sarcoma, full HU but partial field of view) or a few "
    "8-bit key slices (DeepLesion). Expect legs to be the weakest class on a site's whole-body CT.",
    "Pelvis and liver rest on few full-HU patients (two abdomen/pelvis volumes plus key slices); "
    "the per-class tables above give the number of patients behind each class.",
    "Many key slices are 8-bit, with unknown pixel spacing (preprocessing then assumes a 400 mm field of view). "
    "They were used as HU decoded per extra/pixel_encodings.csv: 8-bit PNG -175 + v*450/255 (clipped to the "
    "soft-tissue window), 8-bit JPEG -1024 + v*4095/255 (lossy), 16-bit PNG v - 32768 (exact); during training "
    "a share of the full-HU slices (clip_prob) is clipped to the soft-tissue window too, so the net does not "
    "rely on the lung and bone windows that an 8-bit key slice cannot fill.",
    "Neck from real DICOM is scarce; most neck and lung slices come from head-and-neck radiotherapy "
    "volumes on a coarse 128^3 grid, so one large easy source can hide weak ones: read the per-source table.",
    "Head is a class: its slices are OpenKBP's `other` at and above the lowest Brainstem contour (brain, "
    "posterior fossa, skull base), and the jaw level between brainstem and mandible is labelled head|neck "
    "(trainer.datasets.REGION_MAPPINGS). All head slices come from one source (80 radiotherapy patients on a "
    "coarse 128^3 grid): no cross-source figure exists for head, and a site's full-resolution head CT may differ.",
    "There is no abdomen class: the lower abdomen between liver and pelvis (kidneys, bowel) is labelled `other` "
    "on 12 slices of one volume and about 20 DeepLesion key slices (about 15 patients), too few to train; such "
    "slices are called liver or pelvis. Scouts and reformats were left out of training and get one of the classes.",
    "Real CT shows the table under the patient, OpenKBP (all head and most neck slices) has none: preprocessing "
    "clears everything outside the body for every source (dicomnode/classification/imaging/body.py), since a net "
    "trained without it called the 3 ct/ Philips PET/CT neck slices at shoulder level (a curved PET table under "
    "them) pelvis or lungs, and another seed of the same recipe called 41 of the 100 ct/ slices wrong. A table, "
    "mattress or immobilisation device that touches the body over a wide contact stays part of the body mask.",
    "The top slice of the ct/ Siemens chest series gets neck 0.77 against lungs 0.18, too little for the ordered "
    "decoding (2 nats per switch) to open a one-slice neck range: that series is tagged LUNG, LIVER, one slice "
    "of 30 wrong.",
    "Most head, neck and lung slices come from one coarse grid (OpenKBP, 3.8-5.4 mm pixels) and most lower-body "
    "slices from full-resolution sources, so a net can learn sharpness as a sign of the region: the model "
    "of 2026-12-02 called 17 of 25 ct/ neck slices pelvis after a blur of 1.3x the pixel size. Training "
    "blurs or sharpens 40% of the slices (FieldParams.kernel_prob); a site whose kernels or grids differ "
    "from all the training sources may still see it.",
    "Mining the site's own PACS (`dicomnode mine`, then `dicomnode train`) is the way to a strong model; "
    "this shipped model is a starting point.",
]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def metrics_table(metrics: Mapping[str, Any], classes: Sequence[str]) -> list[str]:
    """Markdown lines: a per-class table (slices, patients, accuracy, AUC) of one evaluation."""
    counts = metrics.get("class_counts", {})
    pats = metrics.get("patients_per_class", {})
    lines = ["| class | slices | patients | accuracy | AUC |", "|---|---:|---:|---:|---:|"]
    for c in classes:
        lines.append(f"| {c} | {counts.get(c, 0)} | {pats.get(c, '-')} | {_fmt(metrics['accuracy'].get(c))} | "
                     f"{_fmt(metrics['auc'].get(c))} |")
    lines.append(f"| **all** | {metrics['n']} | {metrics.get('patients', '-')} | "
                 f"error **{_fmt(metrics.get('error'), 4)}** | mean **{_fmt(metrics.get('mean_auc'), 4)}** |")
    return lines


def _confusion_lines(metrics: Mapping[str, Any]) -> list[str]:
    conf = metrics["confusion"]
    cls = conf["classes"]
    lines = ["| true \\ predicted | " + " | ".join(cls) + " |", "|---|" + "---:|" * len(cls)]
    for name, row in zip(cls, conf["matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def _per_source_lines(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["| source | slices | patients | error | mean AUC |", "|---|---:|---:|---:|---:|"]
    for src, m in sorted(metrics.get("per_source", {}).items()):
        lines.append(f"| {src} | {m['n']} | {m.get('patients', '-')} | {_fmt(m.get('error'), 4)} | "
                     f"{_fmt(m.get('mean_auc'), 4)} |")
    return lines


def _per_kind_lines(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["| input kind | slices | patients | error | mean AUC |", "|---|---:|---:|---:|---:|"]
    for kind, m in sorted(metrics.get("per_input_kind", {}).items()):
        lines.append(f"| {kind} | {m['n']} | {m.get('patients', '-')} | {_fmt(m.get('error'), 4)} | "
                     f"{_fmt(m.get('mean_auc'), 4)} |")
    return lines


def _cross_source_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| trained without | tested on | slices | patients | error | mean AUC | per class error (slices, patients) "
             "| model measured |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r.get("not_possible"):
            lines.append(f"| {r['trained_without']} | {r.get('tested_on', '-')} | - | - | - | - | {r['not_possible']} "
                         "| - |")
            continue
        per = "; ".join(f"{c} {_fmt(None if a is None else 1 - a)} ({r['class_counts'].get(c, 0)}, "
                        f"{r['patients_per_class'].get(c, 0)})"
                        for c, a in r.get("accuracy", {}).items() if r["class_counts"].get(c))
        lines.append(f"| {r['trained_without']} | {r['tested_on']} | {r['n']} | {r.get('patients', '-')} | "
                     f"{_fmt(r.get('error'), 4)} | {_fmt(r.get('mean_auc'), 4)} | {per} | "
                     f"`{r.get('model_version') or '-'}` |")
    return lines


def _series_lines(result: Mapping[str, Any]) -> list[str]:
    lines = ["| set | volumes | patients | slices | slice error | non-neighbour errors | boundaries (missed) | "
             "median mm | p90 mm | max mm |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    s = result["summary"]
    for name, b in [("all", s)] + sorted(s.get("per_source", {}).items()):
        be = b["boundary_error"]
        lines.append(f"| {name} | {b['volumes']} | {b['patients']} | {b['slices_scored']} | {_fmt(b['slice_error'], 4)} | "
                     f"{b['non_neighbour_errors']} | {b['boundaries']} ({b['missed_boundaries']}) | "
                     f"{_fmt(be['median_mm'], 1)} | {_fmt(be['p90_mm'], 1)} | {_fmt(be['max_mm'], 1)} |")
    lines += ["", "| boundary | n | missed | median mm | p90 mm | max mm | median width of the labelled zone (mm) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for t, b in sorted(s.get("per_boundary", {}).items()):
        lines.append(f"| {t} | {b['n']} | {b['missed']} | {_fmt(b['median_mm'], 1)} | {_fmt(b['p90_mm'], 1)} | "
                     f"{_fmt(b['max_mm'], 1)} | {_fmt(b['median_zone_width_mm'], 1)} |")
    return lines


def render_markdown(card: Mapping[str, Any]) -> str:
    """The Markdown text of a card dict (see :func:`write_model_card`)."""
    classes = card["classes"]
    out = [f"# Model card: {card['name']}", "", f"- version: `{card['version']}`"]
    for key in ("created", "architecture", "preprocessing", "training"):
        if card.get(key):
            value = card[key]
            out.append(f"- {key}: " + (f"`{json.dumps(value, sort_keys=True)}`" if isinstance(value, (dict, list))
                                        else str(value)))
    out += ["", "## Data"]
    for src in card.get("data_sources", []):
        out.append(f"- {src}")
    if card.get("split"):
        out += ["", "### Split", "", str(card["split"])]
    if card.get("train_class_counts"):
        out += ["", "### Training set", "", "| class | slices | patients |", "|---|---:|---:|"]
        tc, tp = card["train_class_counts"], card.get("train_patients_per_class", {})
        for c in classes:
            out.append(f"| {c} | {tc.get(c, 0)} | {tp.get(c, '-')} |")
    if card.get("class_balancing"):
        augmented = (card.get("training") or {}).get("augmentation", "none") != "none"
        how = ("each with a fresh random translation, rotation and thin-plate-spline deformation, so a scarce "
               "class is seen in many more augmented copies (the paper's N_aug = N x N_t x N_r x N_d per class)"
               if augmented else "without augmentation (repeated copies of the same slices)")
        out += ["", "### Class balancing", "",
                f"Every epoch draws the same number of slices of each class (with replacement), {how}:", "",
                "| class | training slices | augmented samples drawn | copies per slice |", "|---|---:|---:|---:|"]
        for c in classes:
            b = card["class_balancing"].get(c, {})
            out.append(f"| {c} | {b.get('slices', '-')} | {b.get('drawn', '-')} | {_fmt(b.get('copies_per_slice'), 1)} |")
    for name, metrics in card.get("evaluations", {}).items():
        out += ["", f"## Evaluation: {name}", ""]
        if metrics.get("description"):
            out += [metrics["description"], ""]
        out += metrics_table(metrics, classes)
        out += ["", "Per source:", ""] + _per_source_lines(metrics)
        if metrics.get("per_input_kind"):
            out += ["", "Per input kind (full-field DICOM / NIfTI apart from partial field-of-view crops and "
                    "8-bit / 16-bit key slices):", ""] + _per_kind_lines(metrics)
        out += ["", "Confusion matrix:", ""] + _confusion_lines(metrics)
        five = metrics.get("five_class")
        if five:
            folded = ", ".join(f"{c} into {'/'.join(t)}" for c, t in five.get("folded", {}).items())
            out += ["", f"Five-class view (the paper's classes; {folded}): error **{_fmt(five.get('error'), 4)}**, "
                    f"mean AUC {_fmt(five.get('mean_auc'), 4)} over {five.get('n')} slices."]
    if card.get("cross_source"):
        out += ["", "## Cross-source evaluation (trained without a source, tested on it)", ""]
        if card.get("cross_source_note"):
            out += [str(card["cross_source_note"]), ""]
        out += _cross_source_lines(card["cross_source"])
    for name, result in (card.get("series_evaluations") or {}).items():
        out += ["", f"## Whole-series evaluation: {name}", ""]
        if result.get("description"):
            out += [result["description"], ""]
        out += _series_lines(result)
        out += ["", f"Anchor: median boundary error {result.get('anchor', {}).get('median_boundary_error_mm')} mm "
                f"({result.get('anchor', {}).get('reference')})."]
    if card.get("augmentation_comparison"):
        out += ["", "## With and without augmentation (paper Table 1 protocol)", "",
                "| training | evaluated on | slices | error | mean AUC |", "|---|---|---:|---:|---:|"]
        for row in card["augmentation_comparison"]:
            out.append(f"| {row['training']} | {row['set']} | {row['n']} | {_fmt(row.get('error'), 4)} | "
                       f"{_fmt(row.get('mean_auc'), 4)} |")
        if card.get("augmentation_comparison_note"):
            out += ["", str(card["augmentation_comparison_note"])]
    out += ["", "The paper's figures (Roth et al. 2015, on their data): 5.9% error, mean AUC 0.998."]
    if card.get("figures"):
        out += ["", "## Figures", ""]
        for name, path in card["figures"].items():
            out.append(f"![{name}]({path})" if not str(path).startswith("/") else f"- {name}: `{path}`")
            out.append("")
    out += ["", "## Conventions", ""]
    from trainer.evaluate import CONVENTIONS

    for key, text in CONVENTIONS.items():
        out.append(f"- {key}: {text}")
    out += ["", "## Limits", ""] + [f"- {limit}" for limit in card.get("limits", DEFAULT_LIMITS)]
    return "\n".join(out) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a card is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_model_card(out_dir: str | Path, card: Mapping[str, Any], stem: str = "MODEL_CARD") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` in ``out_dir``; returns both paths.

    ``card`` keys: name, version, classes (required); created, architecture, preprocessing, training,
    data_sources (list of str), split (str), train_class_counts, train_patients_per_class,
    evaluations {name: metrics dict}, augmentation_comparison [{training, set, n, error, mean_auc}],
    figures {name: path}, limits (list of str; default :data:`DEFAULT_LIMITS`).
    """
    for key in ("name", "version", "classes"):
        if key not in card:
            raise ValueError(f"write_model_card: the card lacks {key!r}")
    data = dict(card)
    data.setdefault("limits", DEFAULT_LIMITS)
    out = Path(out_dir)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    _atomic_write(js, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    _atomic_write(md, render_markdown(data))
    return md, js


# ---------------------------------------------------------------------------------------------------
# Building a card from a checkpoint and evaluation JSON files


def _data_sources(training: Mapping[str, Any]) -> list[str]:
    data = training.get("data") or {}
    sources = (data.get("all") or {}).get("sources") or {}
    out = []
    for name, s in sorted(sources.items()):
        counts = ", ".join(f"{c} {n}" for c, n in (s.get("class_counts") or {}).items() if n)
        out.append(f"`{name}`: {s.get('slices')} slices of {s.get('patients')} patients ({counts})")
    for f in data.get("labels_files") or (training.get("settings") or {}).get("labels") or []:
        out.append(f"labels file `{f}`")
    return out


def _split_text(training: Mapping[str, Any]) -> str:
    split = (training.get("data") or {}).get("split") or {}
    if not split:
        return ""
    return (f"patient-level split by `trainer.datasets.split_by_patient` (seed {split.get('seed')}, "
            f"validation fraction {split.get('val_fraction')}, stratified by each patient's rarest class): "
            f"{split.get('train_patients')} training patients, {split.get('val_patients')} validation patients, "
            f"{split.get('shared_patients')} shared.")


def _balancing(training: Mapping[str, Any], train_summary: Mapping[str, Any]) -> dict[str, Any]:
    """Per class: training slices, augmented samples drawn over the epochs run, mean copies per slice."""
    per_class = (training.get("settings") or {}).get("per_class")
    epochs = len(training.get("history") or [])
    counts = train_summary.get("class_counts") or {}
    if not per_class or not epochs or not counts:
        return {}
    return {c: {"slices": n, "drawn": per_class * epochs, "copies_per_slice": round(per_class * epochs / n, 1) if n else None}
            for c, n in counts.items()}


def build_card(model: Any, evaluations: Mapping[str, Mapping[str, Any]], name: str = "dicomnode ConvNet",
               comparison: Sequence[Mapping[str, Any]] | None = None,
               figures: Mapping[str, str] | None = None, limits: Sequence[str] | None = None) -> dict[str, Any]:
    """A card dict for ``model`` (a LoadedModel) from its training record and evaluation dicts."""
    from datetime import datetime, timezone

    training = dict((model.extra or {}).get("training") or {})
    settings = dict(training.get("settings") or {})
    train_summary = (training.get("data") or {}).get("train") or {}
    n_params = sum(int(p.numel()) for p in model.net.parameters())
    card: dict[str, Any] = {
        "name": name,
        "version": model.version,
        "classes": list(model.classes),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": {**model.net_config, "parameters": n_params},
        "preprocessing": model.preprocess.to_dict(),
        "training": {k: settings.get(k) for k in ("epochs", "per_class", "batch_size", "lr", "seed", "augmentation",
                                                  "field_augment_params", "clip_prob", "label_smoothing",
                                                  "val_fraction", "average_last")
                     if k in settings} | {"best_epoch": training.get("best_epoch"),
                                          "averaged_epochs": training.get("averaged_epochs")},
        "data_sources": _data_sources(training),
        "split": _split_text(training),
        "train_class_counts": train_summary.get("class_counts") or {},
        "train_patients_per_class": train_summary.get("patients_per_class") or {},
        "class_balancing": _balancing(training, train_summary),
        "evaluations": {k: dict(v) for k, v in evaluations.items()},
        "augmentation_comparison": list(comparison or []),
        "figures": dict(figures or {}),
    }
    if limits is not None:
        card["limits"] = list(limits)
    return card


def cross_source_row(item: str) -> dict[str, Any]:
    """One cross-source row from ``WITHOUT|TESTED_ON|SOURCE=JSON`` (see ``--cross-source``)."""
    label, _, value = item.partition("=")
    parts = label.split("|")
    if len(parts) != 3:
        raise ValueError(f"--cross-source {item!r}: expected WITHOUT|TESTED_ON|SOURCE=JSON")
    without, tested_on, source = parts
    if value.startswith(("not possible", "not run")):
        return {"trained_without": without, "tested_on": tested_on, "not_possible": value}
    m = json.loads(Path(value).read_text())
    if source:
        m = (m.get("per_source") or {}).get(source) or (m.get("per_input_kind") or {}).get(source)
        if m is None:
            raise ValueError(f"--cross-source {item!r}: {value} has no source or input kind {source!r}")
    return {"trained_without": without, "tested_on": tested_on, "n": m["n"], "patients": m.get("patients"),
            "error": m["error"], "mean_auc": m.get("mean_auc"), "accuracy": m.get("accuracy", {}),
            "class_counts": m.get("class_counts", {}), "patients_per_class": m.get("patients_per_class", {}),
            "model_version": json.loads(Path(value).read_text()).get("model_version")}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.model_card``: write a card from a model and ``dicomnode evaluate --json`` files."""
    import argparse

    from dicomnode.classification.model import load_model

    ap = argparse.ArgumentParser(prog="python -m trainer.model_card", description=main.__doc__)
    ap.add_argument("--model", help="checkpoint or run directory (default: the shipped default model)")
    ap.add_argument("--evaluation", action="append", default=[], metavar="NAME=JSON",
                    help="an evaluation of this model (output of dicomnode evaluate --json); repeatable")
    ap.add_argument("--compare", action="append", default=[], metavar="TRAINING|SET=JSON",
                    help="a row of the with/without augmentation table, e.g. 'no augmentation|held-out=x.json'")
    ap.add_argument("--describe", action="append", default=[], metavar="NAME=TEXT",
                    help="a sentence shown under the evaluation NAME (what the set is, what it overlaps)")
    ap.add_argument("--compare-note", metavar="TEXT", help="a paragraph under the with/without augmentation table")
    ap.add_argument("--cross-source", action="append", default=[], metavar="WITHOUT|TESTED_ON|SOURCE=JSON",
                    help="a cross-source row: the evaluation JSON of a model trained without WITHOUT, on TESTED_ON; "
                         "SOURCE picks its per_source / per_input_kind entry (empty: the whole evaluation); "
                         "'WITHOUT|TESTED_ON|=not possible: reason' records why a source cannot be held out")
    ap.add_argument("--cross-source-from", metavar="CARD_JSON",
                    help="keep the cross-source rows of an earlier card (MODEL_CARD.json) whose trained-without "
                         "source no --cross-source row gives again; each kept row says which model it measured")
    ap.add_argument("--cross-source-note", metavar="TEXT", help="a paragraph above the cross-source table")
    ap.add_argument("--series-evaluation", action="append", default=[], metavar="NAME=JSON",
                    help="output of dicomnode evaluate --series --json; repeatable")
    ap.add_argument("--series-describe", action="append", default=[], metavar="NAME=TEXT")
    ap.add_argument("--name", default="dicomnode ConvNet")
    ap.add_argument("--out", required=True, help="folder of MODEL_CARD.md and MODEL_CARD.json")
    args = ap.parse_args(argv)
    model = load_model(args.model, device="cpu")
    evaluations, figures = {}, {}
    for item in args.evaluation:
        label, _, path = item.partition("=")
        metrics = json.loads(Path(path).read_text())
        evaluations[label] = metrics
        for fig, p in (metrics.get("figures") or {}).items():
            try:  # relative to the card, so the folder can move
                p = str(Path(p).resolve().relative_to(Path(args.out).resolve()))
            except ValueError:
                pass
            figures[f"{label}: {fig}"] = p
    for item in args.describe:
        label, _, text = item.partition("=")
        if label not in evaluations:
            ap.error(f"--describe {label!r}: no --evaluation of that name")
        evaluations[label]["description"] = text
    comparison = []
    for item in args.compare:
        label, _, path = item.partition("=")
        training, _, set_name = label.partition("|")
        m = json.loads(Path(path).read_text())
        comparison.append({"training": training, "set": set_name, "n": m["n"], "error": m["error"],
                           "mean_auc": m["mean_auc"], "model_version": m.get("model_version")})
    card = build_card(model, evaluations, args.name, comparison, figures)
    if args.compare_note:
        card["augmentation_comparison_note"] = args.compare_note
    rows = [cross_source_row(item) for item in args.cross_source]
    if args.cross_source_from:
        fresh = {r["trained_without"] for r in rows}
        try:
            earlier = json.loads(Path(args.cross_source_from).read_text()).get("cross_source") or []
        except (OSError, ValueError) as exc:
            ap.error(f"--cross-source-from {args.cross_source_from}: {exc}")
        rows += [r for r in earlier if r.get("trained_without") not in fresh]
    card["cross_source"] = rows
    if args.cross_source_note:
        card["cross_source_note"] = args.cross_source_note
    series = {}
    for item in args.series_evaluation:
        label, _, path = item.partition("=")
        result = json.loads(Path(path).read_text())
        result.pop("volumes", None)  # the card keeps the summary; the per-volume records stay in the JSON file
        series[label] = result
    for item in args.series_describe:
        label, _, text = item.partition("=")
        if label not in series:
            ap.error(f"--series-describe {label!r}: no --series-evaluation of that name")
        series[label]["description"] = text
    card["series_evaluations"] = series
    md, js = write_model_card(args.out, card)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
