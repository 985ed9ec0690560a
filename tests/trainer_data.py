"""Small real labelled sets for trainer tests, built from ../shared/data (no copies of the images)."""

from __future__ import annotations

import csv

from dicomnode.classification.model import CLASSES
from tests.conftest import SHARED_DATA
from trainer.datasets import map_region


def write_subset_labels(dest, per_class: int = 3):
    """A small labels file of real NIfTI slices from ../shared/data: a few patients per class.

    Regions are written after the documented mapping (``trainer.datasets.map_region``: openkbp's
    brainstem-level ``other`` is ``head``), since the subset's folder is not ``openkbp``."""
    out, seen = [], {}
    for folder in ("openkbp", "volumes", "extra"):
        with open(SHARED_DATA / folder / "labels.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                r["region"] = map_region(folder, r["region"], r["label_method"])
                if not r["path"].endswith((".nii.gz", ".nii")) or r["region"] not in CLASSES:
                    continue
                pats = seen.setdefault(r["region"], {})
                if r["patient"] not in pats and len(pats) >= per_class:
                    continue
                if pats.get(r["patient"], 0) >= 2:
                    continue
                pats[r["patient"]] = pats.get(r["patient"], 0) + 1
                r = dict(r, path=str(SHARED_DATA / folder / r["path"]))
                out.append(r)
    with open(dest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    return dest
