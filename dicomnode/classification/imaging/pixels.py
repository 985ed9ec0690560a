"""Decode one CT image (or one frame of an Enhanced CT) to Hounsfield units, turned as DICOM displays it.

One definition used by the node (worker, ``dicomnode classify``) and by the trainer's DICOM reader.

- Any transfer syntax pydicom's pixel backends decode (native, deflate, RLE, JPEG baseline/extended/
  lossless, JPEG-LS, JPEG 2000) through pylibjpeg / openjpeg / libjpeg / rle / pyjpegls.
- The modality LUT: RescaleSlope/RescaleIntercept from the top level, or from the Pixel Value
  Transformation Sequence of the per-frame / shared functional groups (Enhanced CT).
- JPEG 2000 whose codestream signedness disagrees with PixelRepresentation at full precision
  (e.g. TOSHIBA_J2K_SIZ1_PixRep0: a signed codestream in an "unsigned" dataset) is read with the
  codestream's signedness; pydicom already fixes the case where the precision is below 16 bits.
- Orientation: the array is turned so that it looks as DICOM displays a supine patient in an axial
  slice: rows run anterior -> posterior (+y of LPS) and columns patient right -> left (+x). The turn is
  the one of the 8 flips/rotations (the dihedral group of the square) whose axes are nearest to those
  targets, so a prone slice (row direction -x, column direction -y) comes out rotated 180 degrees, a
  decubitus one rotated by 90 degrees, and an oblique (gantry-tilted) one is only flipped/rotated, never
  resampled. Non-axial images (scouts, coronal/sagittal reformats) are turned to their own display
  convention (columns +x or +y, rows -z: head at the top) so a picture of them looks right too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000TransferSyntaxes

__all__ = [
    "dataset_to_hu", "pixel_spacing_mm", "slice_normal", "image_orientation", "image_position", "rescale",
    "display_turn", "turn_to_display", "number_of_frames", "read_hu", "source_name", "stored_to_hu",
]


def source_name(ds: Dataset) -> str:
    """A name for error messages: the file the dataset came from, else its SOPInstanceUID."""
    filename = getattr(ds, "filename", None)
    if isinstance(filename, (str, Path)) and str(filename):
        return str(filename)
    return f"SOPInstanceUID {ds.get('SOPInstanceUID', '?')}"


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent or unreadable)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _functional_group_value(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> Any:
    """The value of ``keyword`` inside ``sequence`` of the per-frame group of ``frame``, else the shared group."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) > 0:
        groups.append(per_frame[frame or 0] if (frame or 0) < len(per_frame) else None)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared) > 0:
        groups.append(shared[0])
    for group in groups:
        if group is None:
            continue
        seq = group.get(sequence)
        if seq is not None and len(seq) > 0 and keyword in seq[0]:
            return seq[0].get(keyword)
    return None


def _attribute(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        value = _functional_group_value(ds, frame, sequence, keyword)
    return value


def _floats(value: Any, n: int, ds: Dataset, keyword: str) -> np.ndarray | None:
    if value is None or value == "":
        return None
    try:
        items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        values = [float(v) for v in items]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source_name(ds)}: {keyword} {value!r} is not numeric") from exc
    if len(values) != n or not all(np.isfinite(values)):
        raise ValueError(f"{source_name(ds)}: {keyword} must have {n} finite values, got {value!r}")
    return np.asarray(values, dtype=np.float64)


def image_orientation(ds: Dataset, frame: int | None = None) -> np.ndarray | None:
    """ImageOrientationPatient (6 floats: row direction, column direction), or None when absent."""
    iop = _floats(_attribute(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6, ds,
                  "ImageOrientationPatient")
    if iop is None:
        return None
    r, c = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr < 1e-3 or nc < 1e-3:
        raise ValueError(f"{source_name(ds)}: ImageOrientationPatient {list(iop)} has a zero direction vector")
    return np.concatenate([r / nr, c / nc])


def image_position(ds: Dataset, frame: int | None = None) -> np.ndarray | None:
    """ImagePositionPatient (x, y, z of the first pixel's centre, mm), or None when absent."""
    return _floats(_attribute(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3, ds,
                   "ImagePositionPatient")


def slice_normal(ds: Dataset, frame: int | None = None) -> np.ndarray | None:
    """Unit normal of the image plane (row direction x column direction), or None without orientation."""
    iop = image_orientation(ds, frame)
    if iop is None:
        return None
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-3:
        raise ValueError(f"{source_name(ds)}: ImageOrientationPatient row and column directions are parallel")
    return n / norm


def rescale(ds: Dataset, frame: int | None = None) -> tuple[float, float]:
    """(slope, intercept) of the modality LUT; (1, 0) when the dataset has none."""
    slope = _attribute(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _attribute(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    try:
        s = 1.0 if slope in (None, "") else float(slope)
        i = 0.0 if intercept in (None, "") else float(intercept)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source_name(ds)}: RescaleSlope/RescaleIntercept {slope!r}/{intercept!r} "
                         "are not numbers") from exc
    if not (np.isfinite(s) and np.isfinite(i)) or s == 0:
        raise ValueError(f"{source_name(ds)}: RescaleSlope {slope!r} / RescaleIntercept {intercept!r} unusable")
    return s, i


def display_turn(iop: np.ndarray | None) -> tuple[bool, bool, bool]:
    """(transpose, flip_rows, flip_cols) that turn an image with orientation ``iop`` to display orientation.

    Applied in that order: transpose first, then flip axis 0, then flip axis 1. ``None`` (no orientation)
    leaves the image as stored.
    """
    if iop is None:
        return False, False, False
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])  # directions of +column index, +row index
    normal = np.cross(row_dir, col_dir)
    axis = int(np.argmax(np.abs(normal)))
    if axis == 2:  # axial: rows -> +y (posterior), columns -> +x (patient left)
        down, right = np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    elif axis == 1:  # coronal: rows -> -z (feet), columns -> +x
        down, right = np.array([0.0, 0.0, -1.0]), np.array([1.0, 0.0, 0.0])
    else:  # sagittal: rows -> -z, columns -> +y
        down, right = np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0])
    keep = abs(col_dir @ down) + abs(row_dir @ right)
    swap = abs(row_dir @ down) + abs(col_dir @ right)
    transpose = swap > keep + 1e-9
    axis0, axis1 = (row_dir, col_dir) if transpose else (col_dir, row_dir)
    return bool(transpose), bool(axis0 @ down < 0), bool(axis1 @ right < 0)


def turn_to_display(arr: np.ndarray, iop: np.ndarray | None) -> np.ndarray:
    """``arr`` (rows, cols) turned to display orientation (see :func:`display_turn`); a view when possible."""
    transpose, flip_rows, flip_cols = display_turn(iop)
    if transpose:
        arr = arr.T
    if flip_rows:
        arr = arr[::-1, :]
    if flip_cols:
        arr = arr[:, ::-1]
    return arr


def _decode(ds: Dataset, frame: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError(f"{source_name(ds)}: no PixelData")
    frames = number_of_frames(ds)
    if frame is not None and not 0 <= frame < frames:
        raise ValueError(f"{source_name(ds)}: frame {frame} out of range (NumberOfFrames {frames})")
    ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    try:
        arr = pixel_array(ds, index=(frame or 0) if frames > 1 else None)
    except NotImplementedError as exc:
        name = getattr(ts, "name", ts) or "unknown transfer syntax"
        raise ValueError(f"{source_name(ds)}: cannot decode pixel data in transfer syntax {name} ({ts}): {exc}") \
            from exc
    except Exception as exc:  # pixel backends raise many kinds of error on corrupt data
        raise ValueError(f"{source_name(ds)}: pixel data does not decode ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 2:
        raise ValueError(f"{source_name(ds)}: expected a monochrome image, got pixel array of shape {arr.shape} "
                         f"(PhotometricInterpretation {ds.get('PhotometricInterpretation', '?')})")
    if ts in JPEG2000TransferSyntaxes and arr.dtype.kind in "iu" and arr.dtype.itemsize == 2:
        arr = _j2k_full_precision_sign(ds, arr, frame)
    return arr


def _j2k_full_precision_sign(ds: Dataset, arr: np.ndarray, frame: int | None) -> np.ndarray:
    """Read a 16-bit J2K frame as signed when its codestream says signed but PixelRepresentation says not."""
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import get_j2k_parameters

    try:
        frames = generate_frames(ds.PixelData, number_of_frames=number_of_frames(ds))
        codestream = next(f for i, f in enumerate(frames) if i == (frame or 0))
        params = get_j2k_parameters(codestream)
    except Exception:
        return arr
    signed, precision = params.get("is_signed"), params.get("precision")
    if signed is None or precision != 16:
        return arr  # lower precisions are corrected by pydicom (apply_j2k_sign_correction)
    # When the two disagree, the side that says "signed" wins: a signed codestream in an "unsigned" dataset
    # holds negative values (TOSHIBA_J2K_SIZ1_PixRep0), and an unsigned codestream in a signed dataset is
    # already read as signed by pydicom (TOSHIBA_J2K_SIZ0_PixRep1); both give the same image.
    if signed and arr.dtype.kind == "u":
        return arr.view(np.int16)
    return arr


def dataset_to_hu(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Pixels of ``ds`` (frame ``frame`` of a multi-frame image) as float32 HU, turned to display orientation.

    Raises ``ValueError`` naming the file and what is wrong when the pixels cannot be decoded or an
    attribute needed is malformed.
    """
    return stored_to_hu(_decode(ds, frame), ds, frame)


def stored_to_hu(arr: np.ndarray, ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Stored pixel values ``arr`` (rows, columns) of ``ds`` as float32 HU (the modality LUT), turned to
    display orientation: the part of :func:`dataset_to_hu` after decoding."""
    slope, intercept = rescale(ds, frame)
    hu = arr.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    turned = turn_to_display(hu, image_orientation(ds, frame))
    return np.ascontiguousarray(turned)


def pixel_spacing_mm(ds: Dataset, frame: int | None = None) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm after the display turn; None when the dataset gives none.

    PixelSpacing (or, failing that, ImagerPixelSpacing) of the top level or the Pixel Measures Sequence.
    """
    value = _attribute(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    if value in (None, ""):
        value = ds.get("ImagerPixelSpacing")
    spacing = _floats(value, 2, ds, "PixelSpacing")
    if spacing is None:
        return None
    if (spacing <= 0).any():
        raise ValueError(f"{source_name(ds)}: PixelSpacing {list(spacing)} must be positive")
    transpose, _, _ = display_turn(image_orientation(ds, frame))
    row, col = float(spacing[0]), float(spacing[1])
    return (col, row) if transpose else (row, col)


def read_hu(path: str | Path, frame: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read a DICOM file and return (HU image in display orientation, pixel spacing in mm or None)."""
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    return dataset_to_hu(ds, frame), pixel_spacing_mm(ds, frame)
