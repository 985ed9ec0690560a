"""Labelled CT slices from ``labels.csv`` files (the layout of ``../shared/data/*/labels.csv``).

Columns: ``path,slice_index,patient,series,sop_instance_uid,z_mm,region,source,label_method,note``
(``slice_index`` may be absent when every row is a DICOM file). ``path`` is relative to the labels file's
folder: a DICOM file (``slice_index`` = frame of a multi-frame file, optional), a NIfTI volume
(``slice_index`` picks the axial slice; ``vol[:, :, k].T`` is the slice as DICOM displays it) or a PNG/JPEG
whose pixel encoding is given per folder in ``pixel_encodings.csv`` beside the labels file.

``region`` is one of :data:`dicomnode.classification.model.CLASSES`, or two joined by ``|`` (either is right), or a
mark outside the five classes of the data (``other``, ``exclude``, ``other|neck``...). A row whose region
names at least one class is kept with those classes; rows with none are left out (counted).

Derived labels (:data:`REGION_MAPPINGS`). The data's labels name the paper's five classes; ``other``
covers everything else. Where a folder documents *how* its ``other`` was decided, that rule tells which
region it is, and the mapping turns it into a class of the model. The one mapping used:

* ``openkbp/``: ``other`` with ``label_method`` ``mask:brainstem`` is "at or above the lowest slice that
  holds the Brainstem contour (brain, posterior fossa, skull base, upper face)" (openkbp/README.md): that is
  **head**. ``other|neck`` with ``mask:brainstem+mandible`` / ``mask:brainstem+parotid`` is the jaw level
  between the brainstem and the lowest mandible (parotid) slice: **head|neck** (either is right), since the
  skull base / neck boundary lies somewhere in it.

``other`` of ``volumes/`` and ``extra/`` (lower abdomen: kidneys, bowel) is left out: 12 slices of one
TotalSegmentator volume and 20 DeepLesion key slices (about 15 patients) are too few for an abdomen class.

Bad input is collected and raised together as :class:`LabelsError`, each problem as ``file:line: what``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dicomnode.classification.model import CLASSES

log = logging.getLogger("trainer.datasets")

OUTSIDE = ("other", "exclude")
REQUIRED_COLUMNS = ("path", "patient", "region")
ENCODINGS_FILE = "pixel_encodings.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class LabelsError(ValueError):
    """A labels file (or its images) cannot be used; ``problems`` lists ``file:line: what`` strings."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        head = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} problem(s) in the labelled data:\n  {head}{more}")


@dataclass(frozen=True)
class PixelEncoding:
    """How a PNG/JPEG pixel value ``v`` maps to HU: ``hu = offset + v * scale``; ``clipped_to`` if windowed."""

    folder: str
    format: str
    scale: float
    offset: float
    clipped_to: tuple[float, float] | None = None

    def to_hu(self, values: np.ndarray) -> np.ndarray:
        """HU of the pixel values; for a clipped window, values at its low end are read as air (-1000 HU).

        A soft-tissue window maps air and lung alike to its low end (-175 HU); reading that as air gives
        a lung window channel with dark lungs (as in full-HU CT) instead of a flat grey, and the trainer
        clips full-HU slices the same way (see ``trainer.train.clip_to_window``).
        """
        hu = (self.offset + values.astype(np.float32) * np.float32(self.scale)).astype(np.float32)
        if self.clipped_to is not None:
            hu = clip_to_window(hu, self.clipped_to)
        return hu


@dataclass(frozen=True)
class LabelRow:
    """One labelled slice. ``classes`` are the acceptable ones (2 for a boundary slice like lungs|liver)."""

    labels_file: Path
    line: int
    path: Path
    slice_index: int | None
    patient: str
    series: str
    region: str
    classes: tuple[str, ...]
    source: str
    group: str
    z_mm: float | None = None
    sop_instance_uid: str = ""
    label_method: str = ""
    encoding: PixelEncoding | None = field(default=None, compare=False)
    note: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        """``labels_file:line`` for messages."""
        return f"{self.labels_file}:{self.line}"

    @property
    def kind(self) -> str:
        """``dicom``, ``nifti`` or ``image`` (PNG/JPEG)."""
        return file_kind(self.path)

    @property
    def input_kind(self) -> str:
        """What the pixels are, for reports that keep full-field CT apart from crops and key slices:
        ``dicom`` (original DICOM, full field), ``nifti`` (full-field HU), ``crop`` (partial field of view,
        marked ``partial FOV`` in the note), ``key8-soft-tissue`` (8-bit soft-tissue window),
        ``key8-full-range`` (8-bit over the full HU range, JPEG), ``key16`` (16-bit HU PNG)."""
        if "partial fov" in self.note.lower() or "partial field of view" in self.note.lower():
            return "crop"
        if self.kind != "image":
            return self.kind
        enc = self.encoding
        if enc is not None and enc.clipped_to is not None:
            return "key8-soft-tissue"
        if enc is not None and "8-bit" in enc.format:
            return "key8-full-range"
        return "key16"

    @property
    def subgroup(self) -> str:
        """Finer source name: ``group/first-two-folders`` (e.g. ``extra/png8/deeplesion_ssbr``)."""
        try:
            rel = self.path.relative_to(self.labels_file.parent)
            parts = rel.parts[:-1][:2]
        except ValueError:
            parts = ()
        return "/".join((self.group,) + tuple(parts))


def clip_to_window(hu, window: tuple[float, float], air: float = -1000.0):
    """Clip HU (numpy or torch) to ``window``; values at or below its low end become ``air``."""
    lo, hi = window
    if isinstance(hu, np.ndarray):
        return np.where(hu <= lo, np.float32(air), np.minimum(hu, np.float32(hi))).astype(np.float32)
    import torch

    return torch.where(hu <= lo, torch.full_like(hu, air), hu.clamp(max=hi))


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "dicom"


#: (labels folder, region as written, label_method prefix, region it stands for): see the module docstring.
REGION_MAPPINGS: tuple[tuple[str, str, str, str], ...] = (
    ("openkbp", "other", "mask:brainstem", "head"),
    ("openkbp", "other|neck", "mask:brainstem+", "head|neck"),
)


def map_region(group: str, region: str, label_method: str) -> str:
    """The region after :data:`REGION_MAPPINGS` (unchanged when no mapping applies).

    >>> map_region("openkbp", "other", "mask:brainstem")
    'head'
    >>> map_region("extra", "other", "visual")
    'other'
    """
    norm = region.strip().lower()
    for folder, written, method, mapped in REGION_MAPPINGS:
        if group == folder and norm == written and label_method.strip().startswith(method):
            return mapped
    return region


def parse_region(region: str) -> tuple[tuple[str, ...], list[str]]:
    """``"lungs|liver"`` -> (("lungs", "liver"), []); unknown tokens come back in the second list."""
    tokens = [t.strip() for t in region.strip().lower().split("|")]
    classes = tuple(t for t in tokens if t in CLASSES)
    unknown = [t for t in tokens if t not in CLASSES and t not in OUTSIDE]
    return classes, unknown


_HU_FORMULAS = [
    (re.compile(r"^hu\s*=\s*v$"), lambda m: (1.0, 0.0)),
    (re.compile(r"^hu\s*=\s*v\s*([+-])\s*([\d.]+)$"), lambda m: (1.0, float(m[2]) * (1 if m[1] == "+" else -1))),
    (re.compile(r"^hu\s*=\s*(-?[\d.]+)\s*\+\s*v\s*\*\s*([\d.]+)\s*/\s*([\d.]+)$"),
     lambda m: (float(m[2]) / float(m[3]), float(m[1]))),
]


def read_pixel_encodings(path: Path) -> dict[str, PixelEncoding]:
    """``pixel_encodings.csv`` (folder,format,hu_from_value,hu_low,hu_high,note) -> {folder: encoding}."""
    out: dict[str, PixelEncoding] = {}
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("folder", "format", "hu_from_value") if c not in (reader.fieldnames or [])]
        if missing:
            raise LabelsError([f"{path}:1: missing column(s) {missing}"])
        for line, rec in enumerate(reader, start=2):
            formula = (rec.get("hu_from_value") or "").strip().lower()
            for rx, make in _HU_FORMULAS:
                m = rx.match(formula)
                if m:
                    scale, offset = make(m)
                    break
            else:
                problems.append(f"{path}:{line}: cannot read hu_from_value {formula!r} "
                                "(expected 'hu = v', 'hu = v - K' or 'hu = A + v * B / C')")
                continue
            lo, hi = (rec.get("hu_low") or "").strip(), (rec.get("hu_high") or "").strip()
            fmt = (rec.get("format") or "").strip()
            clipped = None
            if lo and hi and "clip" in (rec.get("note") or "").lower() + fmt.lower():
                clipped = (float(lo), float(hi))
            elif lo and hi and float(hi) - float(lo) < 1000:
                clipped = (float(lo), float(hi))
            folder = rec["folder"].strip().strip("/")
            out[folder] = PixelEncoding(folder=folder, format=fmt, scale=scale, offset=offset, clipped_to=clipped)
    if problems:
        raise LabelsError(problems)
    return out


def _encoding_for(rel: Path, encodings: dict[str, PixelEncoding]) -> PixelEncoding | None:
    parent = rel.parent.as_posix()
    best = None
    for folder, enc in encodings.items():
        if parent == folder or parent.startswith(folder + "/"):
            if best is None or len(folder) > len(best.folder):
                best = enc
    return best


def read_labels(path: str | Path, include_outside: bool = False, check_files: bool = True) -> list[LabelRow]:
    """Read one labels file; rows outside the five classes are left out unless ``include_outside``.

    Every problem (missing column, unknown region, missing file, bad slice_index, no pixel encoding for a
    PNG/JPEG, empty patient) is collected; if there is any, :class:`LabelsError` lists them all with
    ``file:line``.
    """
    lf = Path(path).resolve()
    if not lf.is_file():
        raise LabelsError([f"{lf}: labels file not found"])
    base = lf.parent
    group = base.name
    encodings: dict[str, PixelEncoding] = {}
    problems: list[str] = []
    if (base / ENCODINGS_FILE).is_file():
        try:
            encodings = read_pixel_encodings(base / ENCODINGS_FILE)
        except LabelsError as exc:
            problems += exc.problems
    rows: list[LabelRow] = []
    left_out = 0
    with open(lf, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise LabelsError([f"{lf}:1: missing column(s) {missing} (have {cols})"])
        for line, rec in enumerate(reader, start=2):
            where = f"{lf}:{line}"
            if None in rec:
                problems.append(f"{where}: more fields than the header has")
                continue
            region = map_region(group, (rec.get("region") or "").strip(), rec.get("label_method") or "")
            classes, unknown = parse_region(region)
            if not region or unknown:
                problems.append(f"{where}: unknown region {region!r} (expected {'/'.join(CLASSES)}, "
                                f"'a|b', other or exclude)")
                continue
            if not classes and not include_outside:
                left_out += 1
                continue
            rel_s = (rec.get("path") or "").strip()
            patient = (rec.get("patient") or "").strip()
            if not rel_s:
                problems.append(f"{where}: empty path")
                continue
            if not patient:
                problems.append(f"{where}: empty patient")
                continue
            rel = Path(rel_s)
            full = Path(os.path.abspath(base / rel))  # symlinks kept: subgroup stays readable
            kind = file_kind(full)
            si_s = (rec.get("slice_index") or "").strip()
            slice_index = None
            if si_s:
                try:
                    slice_index = int(si_s)
                    if slice_index < 0:
                        raise ValueError
                except ValueError:
                    problems.append(f"{where}: slice_index {si_s!r} is not a non-negative integer")
                    continue
            if kind == "nifti" and slice_index is None:
                problems.append(f"{where}: NIfTI volume {rel_s} needs a slice_index")
                continue
            if check_files and not full.is_file():
                problems.append(f"{where}: file not found: {full}")
                continue
            enc = None
            if kind == "image":
                enc = _encoding_for(rel, encodings)
                if enc is None:
                    problems.append(f"{where}: no pixel encoding for {rel_s} (add its folder to {base / ENCODINGS_FILE})")
                    continue
            z_s = (rec.get("z_mm") or "").strip()
            try:
                z = float(z_s) if z_s else None
            except ValueError:
                problems.append(f"{where}: z_mm {z_s!r} is not a number")
                continue
            rows.append(LabelRow(labels_file=lf, line=line, path=full, slice_index=slice_index, patient=patient,
                                 series=(rec.get("series") or "").strip(), region=region, classes=classes,
                                 source=(rec.get("source") or "").strip(), group=group, z_mm=z,
                                 sop_instance_uid=(rec.get("sop_instance_uid") or "").strip(),
                                 label_method=(rec.get("label_method") or "").strip(), encoding=enc,
                                 note=(rec.get("note") or "").strip()))
    if problems:
        raise LabelsError(problems)
    log.info("%s: %d rows in the model's classes, %d outside them (e.g. 'other') left out", lf, len(rows), left_out)
    return rows


def read_many(paths: Iterable[str | Path]) -> list[LabelRow]:
    """Rows of several labels files; problems of all files reported together."""
    rows: list[LabelRow] = []
    problems: list[str] = []
    for p in paths:
        try:
            rows += read_labels(p)
        except LabelsError as exc:
            problems += exc.problems
    if problems:
        raise LabelsError(problems)
    return rows


# ---------------------------------------------------------------------------------------------------
# Pixels


def _load_nifti_slice(path: Path, k: int, cache: dict | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    import nibabel as nib

    key = str(path)
    if cache is not None and key in cache:
        vol, zooms = cache[key]
    else:
        img = nib.load(str(path))
        vol = np.asanyarray(img.dataobj)
        if vol.ndim == 2:
            vol = vol[:, :, None]
        if vol.ndim != 3:
            raise ValueError(f"{path}: expected a 3-D NIfTI volume, got shape {vol.shape}")
        zooms = tuple(float(z) for z in img.header.get_zooms()[:2])
        if cache is not None:
            cache.clear()  # one volume at a time: rows are grouped by file
            cache[key] = (vol, zooms)
    if not 0 <= k < vol.shape[2]:
        raise ValueError(f"{path}: slice_index {k} outside 0..{vol.shape[2] - 1}")
    hu = np.ascontiguousarray(vol[:, :, k].T).astype(np.float32)
    return hu, (zooms[1], zooms[0])  # (row, col) after the transpose


def _load_image(path: Path, enc: PixelEncoding) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.int64) if im.mode == "I" else np.asarray(im).astype(np.int64)
        elif im.mode == "L":
            arr = np.asarray(im)
        else:
            arr = np.asarray(im.convert("L"))
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a greyscale image, got shape {arr.shape}")
    return enc.to_hu(arr)


def load_image(row: LabelRow, nifti_cache: dict | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The slice of ``row`` as float32 HU in DICOM display orientation, and its (row, col) spacing or None.

    Raises ``ValueError`` naming the labels file and line when the image cannot be read.
    """
    try:
        if row.kind == "nifti":
            return _load_nifti_slice(row.path, int(row.slice_index or 0), nifti_cache)
        if row.kind == "image":
            assert row.encoding is not None
            return _load_image(row.path, row.encoding), None
        from dicomnode.classification.imaging.pixels import read_hu

        hu, spacing = read_hu(row.path, frame=row.slice_index)
        return np.asarray(hu, dtype=np.float32), spacing
    except Exception as exc:
        msg = str(exc) if str(row.path) in str(exc) else f"{row.path}: {exc}"
        raise ValueError(f"{row.where}: cannot read: {msg}") from exc


def load_resampled(rows: Sequence[LabelRow], params, progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """All rows resampled to body-centred HU (N, S, S) int16 (see ``resample_hu``); problems by file:line.

    Returns the array and a list of problems (rows that could not be read keep an all-air slice; the
    caller must refuse to train when the list is not empty).
    """
    from dicomnode.classification.imaging.preprocess import resample_hu

    out = np.full((len(rows), params.size, params.size), int(params.pad_hu), dtype=np.int16)
    problems: list[str] = []
    order = sorted(range(len(rows)), key=lambda i: (str(rows[i].path), rows[i].slice_index or 0))
    cache: dict = {}
    it: Iterable[int] = order
    if progress:
        from tqdm import tqdm

        it = tqdm(order, desc="reading slices", unit="slice", leave=False)
    for i in it:
        try:
            hu, spacing = load_image(rows[i], cache)
            out[i] = np.clip(np.rint(resample_hu(hu, spacing, params)), -32768, 32767).astype(np.int16)
        except ValueError as exc:
            problems.append(str(exc))
    return out, problems


# ---------------------------------------------------------------------------------------------------
# Split and statistics


def class_counts(rows: Sequence[LabelRow]) -> dict[str, int]:
    """Rows per class (a boundary row counts for each of its classes)."""
    c = Counter(cls for r in rows for cls in r.classes)
    return {cls: int(c.get(cls, 0)) for cls in CLASSES}


def patients_per_class(rows: Sequence[LabelRow]) -> dict[str, int]:
    """Distinct patients per class."""
    pats: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        for cls in r.classes:
            pats[cls].add(r.patient)
    return {cls: len(pats.get(cls, ())) for cls in CLASSES}


def summary(rows: Sequence[LabelRow]) -> dict:
    """Counts for reports and the model card: per class, per class patients, per source group."""
    groups: dict[str, list[LabelRow]] = defaultdict(list)
    for r in rows:
        groups[r.subgroup].append(r)
    return {
        "slices": len(rows),
        "patients": len({r.patient for r in rows}),
        "class_counts": class_counts(rows),
        "patients_per_class": patients_per_class(rows),
        "sources": {g: {"slices": len(rs), "patients": len({r.patient for r in rs}), "class_counts": class_counts(rs)}
                    for g, rs in sorted(groups.items())},
    }


def check_classes(rows: Sequence[LabelRow], where: str = "training set") -> None:
    """``LabelsError`` when one of the five classes has no row."""
    counts = class_counts(rows)
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        files = sorted({str(r.labels_file) for r in rows}) or ["(no rows)"]
        raise LabelsError([f"{', '.join(files)}: class {c!r} has no slice in the {where}" for c in empty])


def _patient_key(seed: int, patient: str) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def split_by_patient(rows: Sequence[LabelRow], val_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list[LabelRow], list[LabelRow]]:
    """Deterministic patient-level split (no patient on both sides), stratified by each patient's rarest class.

    Each patient is filed under the class (of its rows) with the fewest patients overall; within each such
    group the patients are ordered by a seeded hash and ``round(val_fraction * n)`` go to validation (at
    least one when the group has 3 or more patients).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ppc = patients_per_class(rows)
    by_patient: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        by_patient[r.patient].update(r.classes)
    groups: dict[str, list[str]] = defaultdict(list)
    for patient, classes in by_patient.items():
        rarest = min(classes, key=lambda c: (ppc[c], CLASSES.index(c))) if classes else "none"
        groups[rarest].append(patient)
    val_patients: set[str] = set()
    for cls in sorted(groups):
        pts = sorted(groups[cls], key=lambda p: _patient_key(seed, p))
        n_val = int(round(val_fraction * len(pts)))
        if val_fraction > 0 and n_val == 0 and len(pts) >= 3:
            n_val = 1
        val_patients.update(pts[:n_val])
    train = [r for r in rows if r.patient not in val_patients]
    val = [r for r in rows if r.patient in val_patients]
    return train, val


def subsample(rows: Sequence[LabelRow], per_class: int, seed: int = 0) -> list[LabelRow]:
    """At most ``per_class`` rows per (first) class, chosen by a seeded shuffle (for dry runs and tests)."""
    rng = random.Random(seed)
    by_class: dict[str, list[LabelRow]] = defaultdict(list)
    for r in rows:
        by_class[r.classes[0]].append(r)
    out: list[LabelRow] = []
    for cls in CLASSES:
        rs = list(by_class.get(cls, []))
        rng.shuffle(rs)
        out += rs[:per_class]
    return out
