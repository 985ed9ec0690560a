"""The one preprocessing of an axial CT slice, shared by the node and the trainer.

A slice arrives as Hounsfield units already turned as DICOM displays a supine patient (rows anterior to
posterior, columns patient right to left; see :mod:`dicomnode.classification.imaging.pixels`). Preprocessing makes the
anatomy look the same whatever the scanner's field of view:

1. **Physical scale.** The slice is resampled to ``pixel_mm`` millimetres per pixel (default 3.2 mm, so
   the ``size`` x ``size`` = 128 x 128 input spans 41 cm: a whole adult abdomen). Downsampling is
   anti-aliased (area average over the integer part of the zoom, then bilinear interpolation). The
   paper's plain 512 -> 256 rescale let a net learn that "a small body in a large field of view is neck".
2. **Body centring.** Pixels above ``body_threshold_hu`` (default -150 HU: fat, muscle, organs, bone;
   not air or lung) form the body mask; the crop is centred on the mask's centroid. The threshold lies
   inside the soft-tissue window (-175..275 HU), so 8-bit soft-tissue-window key slices centre the same
   way. An empty mask centres on the image centre. Outside the source image the crop is filled with
   ``pad_hu`` (air).
   Then, unless ``clear_outside_body`` is off, everything outside the body (the table, its mattress,
   cables, blankets) is set to ``pad_hu``: the table is in real CT and not in OpenKBP's head and neck
   slices, so it must not tell the region (:mod:`dicomnode.classification.imaging.body`).
3. **Unknown pixel spacing** (8-bit key slices, PNG/JPEG): the documented fallback assumes that the image's
   larger side spans ``fallback_fov_mm`` (default 400 mm, the common body reconstruction diameter; a
   512-pixel DeepLesion slice then gets 0.78 mm, close to its real 0.6-0.9 mm).
4. **Windows.** Each input channel is one window ``(low, high)`` in HU mapped linearly to 0..1 and clipped:
   by default soft tissue (-175..275), lung (-1000..200) and bone (-200..1300). A soft-tissue-window
   8-bit image (HU clipped to -175..275 before it reaches us) yields all three channels from the clipped
   HU; the trainer shows the net such clipped inputs on purpose (see ``trainer.datasets``), so it
   learns not to rely on the lung or bone channels alone.

Everything is vectorised with numpy (strided adds for the area average, gathers on the separable output
grid for the bilinear interpolation); no per-pixel Python, no BLAS threads and no torch, so the
node's reader processes decode and preprocess without importing torch. :func:`windows_to_channels` also
takes torch tensors (the trainer maps augmented batches on its device).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from dicomnode.classification.imaging.body import clear_outside_body

__all__ = ["PreprocessParams", "preprocess_slice", "preprocess_batch", "body_centre", "effective_spacing"]

Window = tuple[float, float]


@dataclass(frozen=True)
class PreprocessParams:
    """How a HU slice becomes the net's input (stored in every checkpoint).

    Attributes:
        size: output width and height in pixels (square, S x S).
        pixel_mm: output pixel size in millimetres (field of view = size * pixel_mm).
        windows: one (low_hu, high_hu) per output channel; HU mapped to 0..1 and clipped.
        body_threshold_hu: HU above which a pixel counts as body, for centring and for the body mask.
        centre_body: centre the crop on the body mask's centroid (False: on the image centre).
        fallback_fov_mm: assumed width of the larger image side when the pixel spacing is unknown.
        pad_hu: HU used outside the source image.
        clear_outside_body: set what lies outside the body (the table) to ``pad_hu`` after resampling.
            A checkpoint written before this key existed was trained without it and reads as False.
    """

    size: int = 128
    pixel_mm: float = 3.2
    windows: tuple[Window, ...] = ((-175.0, 275.0), (-1000.0, 200.0), (-200.0, 1300.0))
    body_threshold_hu: float = -150.0
    centre_body: bool = True
    fallback_fov_mm: float = 400.0
    pad_hu: float = -1024.0
    clear_outside_body: bool = True

    def __post_init__(self) -> None:
        windows = tuple((float(lo), float(hi)) for lo, hi in self.windows)
        object.__setattr__(self, "windows", windows)
        if int(self.size) < 8:
            raise ValueError(f"PreprocessParams.size must be >= 8, got {self.size}")
        if not self.pixel_mm > 0:
            raise ValueError(f"PreprocessParams.pixel_mm must be > 0, got {self.pixel_mm}")
        if not self.fallback_fov_mm > 0:
            raise ValueError(f"PreprocessParams.fallback_fov_mm must be > 0, got {self.fallback_fov_mm}")
        if not windows:
            raise ValueError("PreprocessParams.windows must name at least one (low, high) window")
        for lo, hi in windows:
            if not hi > lo:
                raise ValueError(f"PreprocessParams.windows: window ({lo}, {hi}) must have high > low")

    @property
    def channels(self) -> int:
        """Number of input channels (one per window)."""
        return len(self.windows)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (windows as lists)."""
        d = asdict(self)
        d["windows"] = [list(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessParams":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PreprocessParams: unknown keys {unknown}")
        kwargs = dict(d)
        kwargs.setdefault("clear_outside_body", False)  # checkpoints from before the key: trained without it
        if "windows" in kwargs:
            kwargs["windows"] = tuple(tuple(w) for w in kwargs["windows"])
        return cls(**kwargs)


def effective_spacing(shape: Sequence[int], spacing_mm: tuple[float, float] | None,
                      params: PreprocessParams) -> tuple[float, float]:
    """(row, col) spacing in mm; the documented fallback when ``spacing_mm`` is None or not positive."""
    if spacing_mm is not None:
        r, c = float(spacing_mm[0]), float(spacing_mm[1])
        if r > 0 and c > 0 and math.isfinite(r) and math.isfinite(c):
            return r, c
    s = params.fallback_fov_mm / float(max(shape[0], shape[1]))
    return s, s


def body_centre(hu: np.ndarray, threshold: float) -> tuple[float, float]:
    """Centroid (row, col) in pixels of ``hu > threshold``; the image centre when nothing is above it."""
    mask = hu > threshold
    rows, cols = hu.shape
    per_row = mask.sum(axis=1, dtype=np.float64)
    total = float(per_row.sum())
    if total < 1.0:
        return (rows - 1) / 2.0, (cols - 1) / 2.0
    r = float(per_row @ np.arange(rows, dtype=np.float64)) / total
    c = float(mask.sum(axis=0, dtype=np.float64) @ np.arange(cols, dtype=np.float64)) / total
    return r, c


def _as_array(hu) -> np.ndarray:
    if not isinstance(hu, np.ndarray):  # a torch tensor (or anything array-like)
        hu = hu.numpy() if hasattr(hu, "numpy") else np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"preprocess: expected a 2-D slice (rows, cols), got shape {tuple(hu.shape)}")
    if hu.shape[0] < 2 or hu.shape[1] < 2:
        raise ValueError(f"preprocess: slice too small: shape {tuple(hu.shape)}")
    return hu.astype(np.float32, copy=False)


def _area_average(x: np.ndarray, kr: int, kc: int) -> np.ndarray:
    """Mean over ``kr`` x ``kc`` blocks; a partial block at the bottom/right edge averages the pixels it has."""
    rows, cols = x.shape
    out_r, out_c = -(-rows // kr), -(-cols // kc)
    if out_r * kr != rows or out_c * kc != cols:
        padded = np.zeros((out_r * kr, out_c * kc), dtype=np.float32)
        padded[:rows, :cols] = x
        x = padded
    cols_summed = x[:, 0::kc].copy()  # strided adds: several times faster than a reshaped sum
    for i in range(1, kc):
        cols_summed += x[:, i::kc]
    sums = cols_summed[0::kr].copy()
    for i in range(1, kr):
        sums += cols_summed[i::kr]
    n_r = np.minimum(kr, rows - kr * np.arange(out_r)).astype(np.float32)
    n_c = np.minimum(kc, cols - kc * np.arange(out_c)).astype(np.float32)
    return sums / np.outer(n_r, n_c)


def _bilinear(x: np.ndarray, src_r: np.ndarray, src_c: np.ndarray) -> np.ndarray:
    """``x`` sampled bilinearly at every (src_r[j], src_c[k]) (pixel coordinates, a separable grid); a
    neighbour outside the image counts as 0 (zeros padding, as ``grid_sample``'s)."""
    rows, cols = x.shape
    padded = np.zeros((rows + 2, cols + 2), dtype=np.float32)  # a ring of zeros that every outside index hits
    padded[1:-1, 1:-1] = x
    r0, c0 = np.floor(src_r), np.floor(src_c)
    fr = (src_r - r0).astype(np.float32)[:, None]
    fc = (src_c - c0).astype(np.float32)[None, :]
    r_lo = np.clip(r0 + 1, 0, rows + 1).astype(np.intp)
    r_hi = np.clip(r0 + 2, 0, rows + 1).astype(np.intp)
    c_lo = np.clip(c0 + 1, 0, cols + 1).astype(np.intp)
    c_hi = np.clip(c0 + 2, 0, cols + 1).astype(np.intp)
    top, bottom = padded[r_lo], padded[r_hi]
    return ((1 - fr) * ((1 - fc) * top[:, c_lo] + fc * top[:, c_hi])
            + fr * ((1 - fc) * bottom[:, c_lo] + fc * bottom[:, c_hi]))


def _resample(hu: np.ndarray, spacing: tuple[float, float], params: PreprocessParams) -> np.ndarray:
    """HU (rows, cols) -> HU (S, S) at ``params.pixel_mm``, centred on the body (see module docstring)."""
    sr, sc = spacing
    # Anti-alias: average by the integer part of the zoom factor in each direction.
    kr = max(1, int(params.pixel_mm / sr))
    kc = max(1, int(params.pixel_mm / sc))
    x = _area_average(hu, kr, kc) if kr > 1 or kc > 1 else hu
    rows, cols = x.shape
    # The body centroid is found on the averaged image (same physical point, k*k fewer pixels).
    if params.centre_body:
        cr, cc = body_centre(x, params.body_threshold_hu)
    else:
        cr, cc = (rows - 1) / 2.0, (cols - 1) / 2.0
    # Output pixel j (0..S-1) lies (j - (S-1)/2) * pixel_mm from the centre; in averaged pixels that is
    # offs / (spacing * k).
    s = params.size
    offs = (np.arange(s, dtype=np.float64) - (s - 1) / 2.0) * params.pixel_mm
    pad = np.float32(params.pad_hu)
    # Outside the image: zeros padding of (x - pad_hu) means pad_hu after adding it back.
    out = _bilinear(x - pad, cr + offs / (sr * kr), cc + offs / (sc * kc))
    out += pad
    if params.clear_outside_body:
        clear_outside_body(out, params.body_threshold_hu, params.pixel_mm, params.pad_hu)
    return out


def windows_to_channels(hu_s, params: PreprocessParams):
    """HU (..., S, S) -> (..., C, S, S) with each window mapped to 0..1 and clipped.

    ``hu_s`` is a numpy array (float32 result) or a torch tensor (a tensor on its device)."""
    lo = np.array([w[0] for w in params.windows], dtype=np.float32).reshape(-1, 1, 1)
    width = np.array([w[1] - w[0] for w in params.windows], dtype=np.float32).reshape(-1, 1, 1)
    x = hu_s[..., None, :, :]
    if isinstance(hu_s, np.ndarray):
        return np.clip((x - lo) / width, 0.0, 1.0).astype(np.float32, copy=False)
    import torch

    lo_t = torch.from_numpy(lo).to(hu_s.device)
    width_t = torch.from_numpy(width).to(hu_s.device)
    return ((x - lo_t) / width_t).clamp_(0.0, 1.0)


def resample_hu(hu, spacing_mm: tuple[float, float] | None, params: PreprocessParams) -> np.ndarray:
    """Steps 1-3 only: HU slice (numpy array or tensor) -> body-centred float32 (S, S) HU at ``params.pixel_mm``."""
    x = _as_array(hu)
    return _resample(x, effective_spacing(x.shape, spacing_mm, params), params)


def preprocess_slice(hu, spacing_mm: tuple[float, float] | None, params: PreprocessParams) -> np.ndarray:
    """One HU slice (rows, cols), displayed orientation -> float32 (C, S, S) net input.

    ``spacing_mm`` is (row, col) pixel spacing in mm, or None when unknown (see the module docstring).
    Raises ``ValueError`` for anything that is not a 2-D slice.
    """
    return windows_to_channels(resample_hu(hu, spacing_mm, params), params)


def preprocess_batch(items: Iterable[tuple[np.ndarray, tuple[float, float] | None]],
                     params: PreprocessParams) -> np.ndarray:
    """Many ``(hu, spacing_mm)`` pairs -> float32 (N, C, S, S); slices may differ in size and spacing."""
    resampled = [resample_hu(hu, sp, params) for hu, sp in items]
    if not resampled:
        return np.zeros((0, params.channels, params.size, params.size), dtype=np.float32)
    return windows_to_channels(np.stack(resampled), params)
