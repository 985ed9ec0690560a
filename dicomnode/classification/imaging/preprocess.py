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
3. **Unknown pixel spacing** (8-bit key slices, PNG/JPEG): the documented fallback assumes that the image's
   larger side spans ``fallback_fov_mm`` (default 400 mm, the common body reconstruction diameter; a
   512-pixel DeepLesion slice then gets 0.78 mm, close to its real 0.6-0.9 mm).
4. **Windows.** Each input channel is one window ``(low, high)`` in HU mapped linearly to 0..1 and clipped:
   by default soft tissue (-175..275), lung (-1000..200) and bone (-200..1300). A soft-tissue-window
   8-bit image (HU clipped to -175..275 before it reaches us) yields all three channels from the clipped
   HU; the trainer shows the net such clipped inputs on purpose (see ``trainer.datasets``), so it
   learns not to rely on the lung or bone channels alone.

Everything is vectorised with torch (``avg_pool2d`` + ``grid_sample``); no per-pixel Python.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PreprocessParams", "preprocess_slice", "preprocess_batch", "body_centre", "effective_spacing"]

Window = tuple[float, float]


@dataclass(frozen=True)
class PreprocessParams:
    """How a HU slice becomes the net's input (stored in every checkpoint).

    Attributes:
        size: output width and height in pixels (square, S x S).
        pixel_mm: output pixel size in millimetres (field of view = size * pixel_mm).
        windows: one (low_hu, high_hu) per output channel; HU mapped to 0..1 and clipped.
        body_threshold_hu: HU above which a pixel counts as body for centring.
        centre_body: centre the crop on the body mask's centroid (False: on the image centre).
        fallback_fov_mm: assumed width of the larger image side when the pixel spacing is unknown.
        pad_hu: HU used outside the source image.
    """

    size: int = 128
    pixel_mm: float = 3.2
    windows: tuple[Window, ...] = ((-175.0, 275.0), (-1000.0, 200.0), (-200.0, 1300.0))
    body_threshold_hu: float = -150.0
    centre_body: bool = True
    fallback_fov_mm: float = 400.0
    pad_hu: float = -1024.0

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


def body_centre(hu: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Centroid (row, col) in pixels of ``hu > threshold``; the image centre when nothing is above it."""
    mask = (hu > threshold).to(torch.float32)
    total = float(mask.sum())
    rows, cols = hu.shape
    if total < 1.0:
        return (rows - 1) / 2.0, (cols - 1) / 2.0
    r = float((mask.sum(dim=1) * torch.arange(rows, dtype=torch.float32)).sum()) / total
    c = float((mask.sum(dim=0) * torch.arange(cols, dtype=torch.float32)).sum()) / total
    return r, c


def _as_tensor(hu: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(hu)
    if t.ndim != 2:
        raise ValueError(f"preprocess: expected a 2-D slice (rows, cols), got shape {tuple(t.shape)}")
    if t.shape[0] < 2 or t.shape[1] < 2:
        raise ValueError(f"preprocess: slice too small: shape {tuple(t.shape)}")
    return t.to(torch.float32)


def _resample(hu: torch.Tensor, spacing: tuple[float, float], params: PreprocessParams) -> torch.Tensor:
    """HU (rows, cols) -> HU (S, S) at ``params.pixel_mm``, centred on the body (see module docstring)."""
    x = hu[None, None]
    sr, sc = spacing
    # Anti-alias: average-pool by the integer part of the zoom factor in each direction.
    kr = max(1, int(params.pixel_mm / sr))
    kc = max(1, int(params.pixel_mm / sc))
    if kr > 1 or kc > 1:
        x = F.avg_pool2d(x, kernel_size=(kr, kc), stride=(kr, kc), ceil_mode=True, count_include_pad=False)
    rows, cols = x.shape[-2:]
    # The body centroid is found on the pooled image (same physical point, k*k fewer pixels).
    if params.centre_body:
        cr, cc = body_centre(x[0, 0], params.body_threshold_hu)
    else:
        cr, cc = (rows - 1) / 2.0, (cols - 1) / 2.0
    # Output pixel j (0..S-1) lies (j - (S-1)/2) * pixel_mm from the centre; in pooled pixels that is
    # offs / (spacing * k); then grid_sample's normalised coordinates (align_corners=True: -1 = first pixel).
    s = params.size
    offs = (torch.arange(s, dtype=torch.float32) - (s - 1) / 2.0) * params.pixel_mm
    src_r = cr + offs / (sr * kr)
    src_c = cc + offs / (sc * kc)
    gy = 2.0 * src_r / max(rows - 1, 1) - 1.0
    gx = 2.0 * src_c / max(cols - 1, 1) - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # (1, S, S, 2) as (x, y)
    # Outside the image: zeros padding of (x - pad_hu) means pad_hu after adding it back.
    out = F.grid_sample(x - params.pad_hu, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0] + params.pad_hu


def windows_to_channels(hu_s: torch.Tensor, params: PreprocessParams) -> torch.Tensor:
    """HU (..., S, S) -> (..., C, S, S) with each window mapped to 0..1 and clipped."""
    lo = torch.tensor([w[0] for w in params.windows], dtype=torch.float32)
    hi = torch.tensor([w[1] for w in params.windows], dtype=torch.float32)
    shape = (-1, 1, 1)
    x = hu_s.unsqueeze(-3)
    return ((x - lo.view(shape)) / (hi - lo).view(shape)).clamp_(0.0, 1.0)


def resample_hu(hu: np.ndarray | torch.Tensor, spacing_mm: tuple[float, float] | None,
                params: PreprocessParams) -> torch.Tensor:
    """Steps 1-3 only: HU slice -> body-centred (S, S) HU tensor at ``params.pixel_mm``."""
    t = _as_tensor(hu)
    return _resample(t, effective_spacing(t.shape, spacing_mm, params), params)


def preprocess_slice(hu: np.ndarray | torch.Tensor, spacing_mm: tuple[float, float] | None,
                     params: PreprocessParams) -> np.ndarray:
    """One HU slice (rows, cols), displayed orientation -> float32 (C, S, S) net input.

    ``spacing_mm`` is (row, col) pixel spacing in mm, or None when unknown (see the module docstring).
    Raises ``ValueError`` for anything that is not a 2-D slice.
    """
    with torch.no_grad():
        return windows_to_channels(resample_hu(hu, spacing_mm, params), params).numpy()


def preprocess_batch(items: Iterable[tuple[np.ndarray | torch.Tensor, tuple[float, float] | None]],
                     params: PreprocessParams) -> np.ndarray:
    """Many ``(hu, spacing_mm)`` pairs -> float32 (N, C, S, S); slices may differ in size and spacing."""
    with torch.no_grad():
        resampled = [resample_hu(hu, sp, params) for hu, sp in items]
        if not resampled:
            return np.zeros((0, params.channels, params.size, params.size), dtype=np.float32)
        return windows_to_channels(torch.stack(resampled), params).numpy()
