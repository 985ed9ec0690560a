"""Group DICOM files into series, read their geometry, decide whether a series is in scope, order its slices.

Scope: the classifier sees axial CT. A series is *skipped* (with a recorded reason) when it is not CT,
not a CT image SOP class, a localizer/scout (ImageType LOCALIZER), a non-axial reformat (the slice
normal more than :data:`MAX_AXIAL_TILT_DEG` from the patient's head-feet axis: gantry tilts of 15-30
degrees stay axial), made of tiny images, or has fewer slices than ``worker.min_slices``.
A series in scope whose geometry is inconsistent (several orientations, mixed image sizes, two
slices at one position) raises :class:`SeriesError`: a failure with a clear reason, not a skip.

Order: slices run top (head) to bottom (feet), by ImagePositionPatient projected on the slice normal
(the normal turned to point to the head, +z of LPS); InstanceNumber ascending only when a slice lacks
position or orientation, and file order when it lacks both.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.classification.imaging.pixels import image_orientation, image_position, number_of_frames, pixel_spacing_mm

log = logging.getLogger("dicomnode.classification.imaging.series")

#: Largest angle (degrees) between the slice normal and the head-feet axis for a slice to count as axial.
MAX_AXIAL_TILT_DEG = 45.0
#: Images smaller than this (rows or columns) are not classified.
MIN_MATRIX = 64
#: Two slices closer than this along the normal (mm) are "at the same position".
SAME_POSITION_MM = 1e-3
#: Largest difference between two orientations' direction cosines that still counts as "the same".
ORIENTATION_TOLERANCE = 1e-3

CT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "ImageType",
    "InstanceNumber", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "ImagerPixelSpacing",
]


class SeriesError(ValueError):
    """A series in scope cannot be classified as a whole: inconsistent geometry, mixed sizes, ..."""


@dataclass(frozen=True)
class SliceHeader:
    """What ordering, scope and decoding need of one slice (one frame of a multi-frame file)."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    instance_number: int | None = None
    rows: int = 0
    columns: int = 0
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient, unit vectors
    position: tuple[float, float, float] | None = None  # ImagePositionPatient
    spacing_mm: tuple[float, float] | None = None  # after the display turn
    frame: int | None = None  # frame index within a multi-frame file; None for single-frame
    n_frames: int = 1


@dataclass
class SeriesPlan:
    """A series ready to classify (or the reason it is skipped)."""

    series_instance_uid: str
    slices: list[SliceHeader]  # top -> bottom when in scope
    z_mm: list[float | None] = field(default_factory=list)  # patient z (LPS, mm) of each slice
    order_source: str = "position"  # position | instance_number | file
    skip_reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def in_scope(self) -> bool:
        return not self.skip_reason


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def headers_from_dataset(ds: Dataset, path: Path) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame of ``ds`` (read from ``path``). Raises ``ValueError`` on bad geometry."""
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    if not series_uid or not sop_uid:
        raise ValueError(f"{path}: missing SeriesInstanceUID or SOPInstanceUID")
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    common = dict(
        path=Path(path), sop_instance_uid=sop_uid, series_instance_uid=series_uid,
        sop_class_uid=str(ds.get("SOPClassUID", "") or ""), modality=str(ds.get("Modality", "") or "").upper(),
        image_type=tuple(str(t).strip().upper() for t in image_type),
        instance_number=_int_or_none(ds.get("InstanceNumber")), rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
    )
    frames = number_of_frames(ds)
    out = []
    for frame in (range(frames) if frames > 1 else [None]):
        iop = image_orientation(ds, frame)
        ipp = image_position(ds, frame)
        out.append(SliceHeader(
            **common,
            orientation=None if iop is None else tuple(float(v) for v in iop),
            position=None if ipp is None else (float(ipp[0]), float(ipp[1]), float(ipp[2])),
            spacing_mm=pixel_spacing_mm(ds, frame), frame=frame, n_frames=frames,
        ))
    return out


def read_headers(path: str | os.PathLike[str]) -> list[SliceHeader]:
    """Read the header (no pixel data) of one DICOM file. Raises ``ValueError`` naming the file."""
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    return headers_from_dataset(ds, Path(path))


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files named in ``paths``, folders walked recursively (sorted; hidden files and DICOMDIR left out)."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith(".") or name.upper() == "DICOMDIR":
                        continue
                    yield Path(root) / name
        elif p.is_file():
            yield p
        else:
            raise ValueError(f"{p}: no such file or folder")


def group_series(paths: Iterable[str | os.PathLike[str]]) -> tuple[dict[str, list[SliceHeader]], list[str]]:
    """Read the headers of every file under ``paths`` and group them by SeriesInstanceUID.

    Returns ``(series, problems)``: files that are not DICOM, and second copies of one SOP instance, are
    listed in ``problems`` (one line each) and otherwise ignored.
    """
    def read(path: Path) -> list[SliceHeader] | str:
        try:
            return read_headers(path)
        except ValueError as exc:
            return str(exc)

    return group_headers((path, read(path)) for path in iter_files(paths))


def group_headers(files: Iterable[tuple[Path, list[SliceHeader] | str]]) -> tuple[dict[str, list[SliceHeader]], list[str]]:
    """Group the headers of files (in file order) by SeriesInstanceUID, as :func:`group_series` does.

    ``files`` holds, per file, its headers or the reason it could not be read (a problem line). The first
    copy of a SOP instance (and frame) is kept; later copies are listed in ``problems``.
    """
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    problems: list[str] = []
    seen: dict[tuple[str, int | None], Path] = {}
    for path, headers in files:
        if isinstance(headers, str):
            problems.append(headers)
            continue
        for h in headers:
            key = (h.sop_instance_uid, h.frame)
            if key in seen:
                problems.append(f"{path}: same SOPInstanceUID as {seen[key]}; kept the first copy")
                continue
            seen[key] = path
            groups[h.series_instance_uid].append(h)
    return dict(groups), problems


def _angle_to_axial(orientation: tuple[float, ...]) -> float:
    n = np.cross(orientation[:3], orientation[3:])
    n /= np.linalg.norm(n)
    return float(np.degrees(np.arccos(min(1.0, abs(n[2])))))


def scope_reason(slices: list[SliceHeader], min_slices: int) -> str:
    """Why the series of ``slices`` is out of scope, or "" when it is to be classified."""
    if not slices:
        return "series has no images"
    modalities = sorted({s.modality or "(none)" for s in slices})
    if modalities != ["CT"]:
        return f"modality {'/'.join(modalities)} is not CT"
    classes = sorted({s.sop_class_uid for s in slices} - set(CT_IMAGE_SOP_CLASSES))
    if classes:
        return f"SOP class {', '.join(classes)} is not a CT image (CT, Enhanced CT or Legacy Converted)"
    scouts = [s for s in slices if "LOCALIZER" in s.image_type]
    if scouts:
        image_type = "\\".join(scouts[0].image_type)
        return f"localizer/scout: ImageType {image_type} contains LOCALIZER"
    tilted = [(s, _angle_to_axial(s.orientation)) for s in slices if s.orientation is not None]
    tilted = [(s, a) for s, a in tilted if a > MAX_AXIAL_TILT_DEG]
    if tilted:
        s, angle = tilted[0]
        return (f"not axial: slice normal {angle:.0f} degrees from the head-feet axis "
                f"(ImageOrientationPatient {[round(v, 3) for v in s.orientation]}; limit {MAX_AXIAL_TILT_DEG:.0f})")
    small = [s for s in slices if min(s.rows, s.columns) < MIN_MATRIX]
    if small:
        return f"images too small to classify: {small[0].rows}x{small[0].columns} (minimum {MIN_MATRIX})"
    if len(slices) < min_slices:
        return f"{len(slices)} slice(s), fewer than worker.min_slices={min_slices}"
    return ""


def check_geometry(slices: list[SliceHeader]) -> None:
    """Raise :class:`SeriesError` when the slices do not form one stack of one size and orientation."""
    sizes = Counter((s.rows, s.columns) for s in slices)
    if len(sizes) > 1:
        detail = ", ".join(f"{r}x{c} ({n} slices)" for (r, c), n in sizes.most_common())
        raise SeriesError(f"mixed image sizes in one series: {detail}")
    orientations = [np.asarray(s.orientation) for s in slices if s.orientation is not None]
    if orientations:
        ref = orientations[0]
        for s in slices:
            if s.orientation is not None and np.abs(np.asarray(s.orientation) - ref).max() > ORIENTATION_TOLERANCE:
                raise SeriesError(
                    f"inconsistent geometry: {s.path.name} (SOPInstanceUID {s.sop_instance_uid}) has "
                    f"ImageOrientationPatient {[round(v, 4) for v in s.orientation]}, the first slice "
                    f"{[round(float(v), 4) for v in ref]}")


def order_slices(slices: list[SliceHeader]) -> tuple[list[SliceHeader], list[float | None], str]:
    """Slices top -> bottom, their patient z (mm), and what the order came from.

    Raises :class:`SeriesError` when two slices share a position.
    """
    if slices and all(s.position is not None and s.orientation is not None for s in slices):
        iop = np.asarray(slices[0].orientation)
        normal = np.cross(iop[:3], iop[3:])
        normal /= np.linalg.norm(normal)
        if normal[2] < 0:
            normal = -normal  # point to the head (+z in LPS) so that "larger" is "higher"
        d = np.array([np.dot(s.position, normal) for s in slices])
        order = np.argsort(-d, kind="stable")
        gaps = -np.diff(d[order])
        if len(gaps) and gaps.min() < SAME_POSITION_MM:
            i = int(np.argmin(gaps))
            a, b = slices[order[i]], slices[order[i + 1]]
            raise SeriesError(
                f"inconsistent geometry: {a.path.name} and {b.path.name} lie at the same position "
                f"({d[order[i]]:.2f} mm along the slice normal)")
        ordered = [slices[i] for i in order]
        return ordered, [s.position[2] for s in ordered], "position"
    if slices and all(s.instance_number is not None for s in slices):
        ordered = sorted(slices, key=lambda s: (s.instance_number, s.frame or 0))
        source = "instance_number"
    else:
        ordered = list(slices)
        source = "file"
    return ordered, [s.position[2] if s.position is not None else None for s in ordered], source


def slice_gaps_mm(plan: SeriesPlan) -> list[float]:
    """Distances between consecutive slices along z (mm); empty when positions are unknown."""
    z = [v for v in plan.z_mm if v is not None]
    if len(z) != len(plan.z_mm):
        return []
    return [abs(b - a) for a, b in zip(z, z[1:])]


def plan_series(slices: list[SliceHeader], min_slices: int) -> SeriesPlan:
    """Decide scope and order for one series' slices. Raises :class:`SeriesError` on inconsistent geometry."""
    uid = slices[0].series_instance_uid if slices else ""
    reason = scope_reason(slices, min_slices)
    if reason:
        return SeriesPlan(uid, list(slices), skip_reason=reason)
    check_geometry(slices)
    ordered, z, source = order_slices(slices)
    plan = SeriesPlan(uid, ordered, z_mm=z, order_source=source)
    if source != "position":
        plan.notes.append(f"slices ordered by {source.replace('_', ' ')} (ImagePositionPatient or "
                          "ImageOrientationPatient missing)")
    gaps = slice_gaps_mm(plan)
    if gaps and max(gaps) - min(gaps) > 0.1:
        plan.notes.append(f"slice spacing varies from {min(gaps):.2f} to {max(gaps):.2f} mm")
    return plan
