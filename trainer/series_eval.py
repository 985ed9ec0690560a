"""Whole-series evaluation: labelled NIfTI volumes as the node's real input, scored slice by slice and
boundary by boundary (``dicomnode evaluate --series``).

Each labelled NIfTI volume (``openkbp/``, ``volumes/``: one file, ``slice_index`` = axial slice) becomes a
CT series of single-frame DICOM files in a temporary folder (:func:`write_dicom_series`): int16 HU, the
geometry of the NIfTI affine (ImagePositionPatient, ImageOrientationPatient 1\\0\\0\\0\\1\\0, PixelSpacing),
InstanceNumbers *shuffled*, so that the series has to be ordered by position as a real one; volumes
cropped in-plane to the body are padded with air to at least 128 x 128 pixels (a scanner's field of view). It then goes
through exactly what the worker runs: :func:`dicomnode.classification.imaging.series.plan_series`
(headers, scope, order) and :func:`dicomnode.classification.pipeline.classify_plan` (read, decode, the
node's preprocessing, inference, ordered decoding of :mod:`dicomnode.classification.regions`).

Measures (all slices of the volume are classified; the labelled rows given are scored):

- **slice error**: fraction of scored slices whose *decoded* region (the Viterbi path, not the arg max) is
  not among the row's classes (``a|b``: either is right). ``argmax_error`` is the same for the per-slice
  arg max, before decoding.
- **non-neighbour errors**: scored slices whose decoded region is not a neighbour, in the model's chain,
  of any of the row's classes (e.g. neck called legs): the confusion ordered decoding must prevent.
- **boundary error (mm)**, per pair of consecutive classes A > B that both occur in a volume's labels. The
  labelled transition zone runs along z from the midpoint between the lowest slice labelled A alone and
  the slice below it, to the midpoint between the highest slice labelled B alone and the slice above it:
  a single point when A-only is directly followed by B-only; it covers the slices labelled ``A|B`` (or
  anything else between them, e.g. ``other``) when there are such. The predicted boundary is the midpoint
  between the lowest slice decoded A and the highest slice decoded B. ``error_mm`` = distance from the
  predicted boundary to the zone (0 inside it); ``error_to_midpoint_mm`` = distance to the zone's middle.
  A boundary whose A or B does not appear in the decoded path is counted as **missed** (no error value).
  The anchor: Ouyang et al. (2022) report a median boundary error of 8.9 mm for CT.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("trainer.series_eval")

ANCHOR_MM = 8.9  # Ouyang et al. 2022, median boundary error on CT
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AIR_HU = -1024
MIN_SLICES = 5  # NIfTI files with fewer slices (single-slice crops, key slices) are not series


def write_dicom_series(nifti_path: Path, out_dir: Path, seed: int = 0, min_size: int = 128) -> list[Path]:
    """Write every axial slice of a NIfTI volume (the data's orientation rule) as a CT DICOM file.

    ``vol[:, :, k].T`` is slice k as DICOM displays it (rows anterior -> posterior, columns patient right
    -> left), z from the affine (superior positive) is written as LPS z. Returns the paths, in slice
    order k = 0.. (the files' InstanceNumbers are a seeded permutation). Slices smaller than ``min_size``
    pixels (volumes cropped to the body) are padded with air to that size, the geometry kept.
    ``ValueError`` names the file when it is not a 3-D volume.
    """
    import nibabel as nib
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = nib.load(str(nifti_path))
    vol = np.asanyarray(img.dataobj)
    if vol.ndim != 3:
        raise ValueError(f"{nifti_path}: expected a 3-D NIfTI volume, got shape {vol.shape}")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    affine = img.affine
    n = vol.shape[2]
    numbers = list(range(1, n + 1))
    random.Random(f"{seed}:{nifti_path.name}").shuffle(numbers)
    key = str(nifti_path.resolve())
    study_uid = generate_uid(entropy_srcs=["study", key])
    series_uid = generate_uid(entropy_srcs=["series", key])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # Volumes cropped in-plane to the body (OpenKBP: 52-90 pixels of 3.8-5.4 mm) are padded with air to
    # at least ``min_size`` pixels, as the scanner's field of view would be; the origin moves with the pad.
    pad_r = max(0, min_size - vol.shape[1])
    pad_c = max(0, min_size - vol.shape[0])
    top, left = pad_r // 2, pad_c // 2
    for k in range(n):
        hu = np.ascontiguousarray(vol[:, :, k].T).astype(np.int16)
        if pad_r or pad_c:
            hu = np.pad(hu, ((top, pad_r - top), (left, pad_c - left)), constant_values=AIR_HU)
        # NIfTI world coordinates are RAS; DICOM's patient coordinates LPS.
        xr, yr, z = (float(v) for v in (affine @ np.array([-left, -top, k, 1.0]))[:3])
        x0, y0 = -xr, -yr
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["sop", key, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientID = "SERIES-EVAL"
        ds.InstanceNumber = numbers[k]
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{zooms[1]:.6g}", f"{zooms[0]:.6g}"]  # (row, col) after the transpose
        ds.SliceThickness = f"{zooms[2]:.6g}"
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = hu.tobytes()
        path = out_dir / f"slice_{k:04d}.dcm"
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _zone_and_prediction(z: list[float], label_sets: list[frozenset[str] | None], decoded: list[str],
                         a: str, b: str) -> dict[str, Any] | None:
    """One boundary A > B of a series ordered top -> bottom (see the module docstring); None if not labelled."""
    only_a = [i for i, s in enumerate(label_sets) if s == frozenset({a})]
    only_b = [i for i, s in enumerate(label_sets) if s == frozenset({b})]
    if not only_a or not only_b:
        return None
    last_a, first_b = max(only_a), min(only_b)
    if last_a >= first_b:  # A-only slices below B-only ones: labels not in this order; not a boundary
        return None
    top = (z[last_a] + z[last_a + 1]) / 2.0
    bottom = (z[first_b - 1] + z[first_b]) / 2.0
    zone = (min(top, bottom), max(top, bottom))
    rec: dict[str, Any] = {"boundary": f"{a}/{b}", "zone_mm": [round(zone[0], 2), round(zone[1], 2)],
                           "zone_width_mm": round(zone[1] - zone[0], 2)}
    dec_a = [i for i, r in enumerate(decoded) if r == a]
    dec_b = [i for i, r in enumerate(decoded) if r == b]
    if not dec_a or not dec_b or max(dec_a) >= min(dec_b):
        rec.update(missed=True, error_mm=None, error_to_midpoint_mm=None)
        return rec
    pa, pb = max(dec_a), min(dec_b)
    pred = (z[pa] + z[pb]) / 2.0
    outside = 0.0 if zone[0] <= pred <= zone[1] else min(abs(pred - zone[0]), abs(pred - zone[1]))
    rec.update(missed=False, predicted_mm=round(pred, 2), error_mm=round(outside, 2),
               error_to_midpoint_mm=round(abs(pred - (zone[0] + zone[1]) / 2.0), 2))
    return rec


def score_series(classes: Sequence[str], z: list[float], label_sets: list[frozenset[str] | None],
                 decoded: list[str], argmax: list[str]) -> dict[str, Any]:
    """Slice and boundary measures of one series ordered top -> bottom (``label_sets[i]`` None: not scored)."""
    order = {c: i for i, c in enumerate(classes)}
    scored = [i for i, s in enumerate(label_sets) if s]
    wrong = [i for i in scored if decoded[i] not in label_sets[i]]
    wrong_argmax = [i for i in scored if argmax[i] not in label_sets[i]]
    far = [i for i in scored
           if all(abs(order[decoded[i]] - order[c]) > 1 for c in label_sets[i] if c in order)]
    present = sorted({c for i in scored for c in label_sets[i] if c in order}, key=order.get)
    boundaries = []
    for a, b in zip(present, present[1:]):
        rec = _zone_and_prediction(z, label_sets, decoded, a, b)
        if rec is not None:
            boundaries.append(rec)
    return {"scored": len(scored), "errors": len(wrong), "argmax_errors": len(wrong_argmax),
            "non_neighbour_errors": len(far), "boundaries": boundaries,
            "wrong": [{"position": i, "z_mm": round(z[i], 2), "labels": "|".join(sorted(label_sets[i])),
                       "decoded": decoded[i]} for i in wrong[:50]]}


def evaluate_volume(model: Any, nifti_path: Path, labels_by_index: dict[int, frozenset[str]],
                    workdir: Path, decode: Any = None) -> dict[str, Any]:
    """Classify one volume as a DICOM series through the node's pipeline and score it."""
    from dicomnode.classification.imaging.series import plan_series, read_headers
    from dicomnode.classification.pipeline import classify_plan

    folder = Path(tempfile.mkdtemp(prefix="series-", dir=workdir))
    try:
        paths = write_dicom_series(nifti_path, folder)
        index_of = {}
        headers = []
        for k, p in enumerate(paths):
            hs = read_headers(p)
            headers += hs
            index_of[hs[0].sop_instance_uid] = k
        plan = plan_series(headers, 1)
        if not plan.in_scope:
            raise ValueError(f"{nifti_path}: the series written from it is out of scope: {plan.skip_reason}")
        result = classify_plan(plan, model, decode=decode)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ks = [index_of[s.sop_instance_uid] for s in result.slices]
    z = [float(s.z_mm) for s in result.slices]
    sets = [labels_by_index.get(k) for k in ks]
    decoded = [s.region for s in result.slices]
    argmax = [s.predicted for s in result.slices]
    rec = score_series(tuple(model.classes), z, sets, decoded, argmax)
    rec.update(path=str(nifti_path), n_slices=len(ks), order_source=result.order_source,
               ordered_top_down=bool(all(a > b for a, b in zip(z, z[1:]))),
               regions=[f"{r.region}[{r.first_position}-{r.last_position}]" for r in result.regions])
    return rec


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median_mm": None, "mean_mm": None, "p90_mm": None, "max_mm": None}
    v = np.asarray(values, dtype=float)
    return {"n": len(values), "median_mm": round(float(np.median(v)), 2), "mean_mm": round(float(v.mean()), 2),
            "p90_mm": round(float(np.percentile(v, 90)), 2), "max_mm": round(float(v.max()), 2)}


def evaluate_series(model: Any, rows: Sequence[Any], limit: int = 0, decode: Any = None,
                    progress: bool = False, min_slices: int = MIN_SLICES) -> dict[str, Any]:
    """Series measures over the NIfTI volumes of labelled ``rows`` (``trainer.datasets.LabelRow``).

    Rows of other kinds (DICOM, PNG) are counted and left out, and so are NIfTI files with fewer than
    ``min_slices`` slices (single-slice crops are not series). ``limit`` > 0 evaluates only the first
    ``limit`` volumes (sorted by path). Returns per-volume records and the summary (see the module
    docstring); ``ValueError`` when no row belongs to a NIfTI volume.
    """
    import nibabel as nib

    by_path: dict[Path, dict[int, frozenset[str]]] = defaultdict(dict)
    meta: dict[Path, tuple[str, str]] = {}
    other_kinds = 0
    for r in rows:
        if r.kind != "nifti" or r.slice_index is None:
            other_kinds += 1
            continue
        by_path[r.path][int(r.slice_index)] = frozenset(c for c in r.classes if c in model.classes)
        meta[r.path] = (r.patient, r.group)
    short = sorted(p for p in by_path if int(nib.load(str(p)).shape[-1] if len(nib.load(str(p)).shape) == 3 else 1)
                   < min_slices)
    for p in short:
        other_kinds += len(by_path.pop(p))
    if not by_path:
        raise ValueError("evaluate --series: none of the labelled rows belongs to a NIfTI volume "
                         f"of at least {min_slices} slices")
    paths = sorted(by_path)
    if limit > 0:
        paths = paths[:limit]
    volumes, failed = [], []
    it: Any = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="series", unit="volume")
    with tempfile.TemporaryDirectory(prefix="dicomnode-series-eval-") as work:
        for p in it:
            try:
                rec = evaluate_volume(model, p, by_path[p], Path(work), decode)
            except (ValueError, OSError) as exc:
                log.warning("series evaluation of %s failed: %s", p, exc)
                failed.append({"path": str(p), "error": str(exc)})
                continue
            rec["patient"], rec["source"] = meta[p]
            volumes.append(rec)
    return {"volumes": volumes, "failed": failed, "rows_not_in_volumes": other_kinds,
            "short_volumes_left_out": len(short),
            "summary": summarize(volumes), "anchor": {"median_boundary_error_mm": ANCHOR_MM,
                                                       "reference": "Ouyang et al. 2022, CT"}}


def summarize(volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over volume records: overall and per source, and boundary errors per boundary type."""
    def block(vs: list[dict[str, Any]]) -> dict[str, Any]:
        scored = sum(v["scored"] for v in vs)
        bounds = [b for v in vs for b in v["boundaries"]]
        per_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for b in bounds:
            per_type[b["boundary"]].append(b)
        got = [b["error_mm"] for b in bounds if not b["missed"]]
        return {
            "volumes": len(vs), "patients": len({v.get("patient") for v in vs}), "slices_scored": scored,
            "slice_errors": sum(v["errors"] for v in vs),
            "slice_error": round(sum(v["errors"] for v in vs) / scored, 5) if scored else None,
            "argmax_slice_error": round(sum(v["argmax_errors"] for v in vs) / scored, 5) if scored else None,
            "non_neighbour_errors": sum(v["non_neighbour_errors"] for v in vs),
            "boundaries": len(bounds), "missed_boundaries": sum(b["missed"] for b in bounds),
            "boundary_error": _summary(got),
            "boundary_error_to_midpoint": _summary([b["error_to_midpoint_mm"] for b in bounds if not b["missed"]]),
            "per_boundary": {t: {**_summary([b["error_mm"] for b in bs if not b["missed"]]),
                                 "missed": sum(b["missed"] for b in bs),
                                 "median_zone_width_mm": round(float(np.median([b["zone_width_mm"] for b in bs])), 2)}
                             for t, bs in sorted(per_type.items())},
            "all_ordered_top_down": all(v["ordered_top_down"] for v in vs),
        }

    out = block(volumes)
    sources = sorted({v.get("source", "") for v in volumes})
    out["per_source"] = {s: block([v for v in volumes if v.get("source", "") == s]) for s in sources}
    return out


def format_series_summary(result: dict[str, Any]) -> str:
    """Human-readable summary of :func:`evaluate_series`."""
    def line(name: str, s: dict[str, Any]) -> str:
        be = s["boundary_error"]
        return (f"{name:<12} volumes {s['volumes']:>4}  slices {s['slices_scored']:>6}  slice error "
                f"{s['slice_error'] if s['slice_error'] is not None else '-'}  non-neighbour {s['non_neighbour_errors']}  "
                f"boundaries {s['boundaries']} (missed {s['missed_boundaries']})  median {be['median_mm']} mm  "
                f"p90 {be['p90_mm']} mm")

    s = result["summary"]
    lines = [line("all", s)]
    lines += [line(src, v) for src, v in s["per_source"].items()]
    for t, b in s["per_boundary"].items():
        lines.append(f"  boundary {t:<14} n {b['n']:>4}  missed {b['missed']}  median {b['median_mm']} mm  "
                     f"p90 {b['p90_mm']} mm  max {b['max_mm']} mm  (zone width median {b['median_zone_width_mm']} mm)")
    lines.append(f"anchor: median boundary error {result['anchor']['median_boundary_error_mm']} mm "
                 f"({result['anchor']['reference']})")
    for f in result["failed"][:10]:
        lines.append(f"failed: {f['error']}")
    return "\n".join(lines)
