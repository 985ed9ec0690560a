"""The patient's body in a resampled slice, apart from what lies around it (the table, its mattress,
cables, a blanket, the gantry's edge).

Real CT shows the table under the patient, in a shape of its own per scanner; OpenKBP, the only source of
head and most neck slices, has everything outside the body set to air. A net trained on both learns "a
table means not head or neck" (the 3 Philips PET/CT neck slices of ``ct/``, with a curved PET table under
them, were called lungs and pelvis). Preprocessing therefore clears what is not the body, for every
source alike, so the table tells nothing.

The body is found on the resampled (S, S) HU slice at ``pixel_mm`` (3.2 mm):

1. ``above``: pixels above the body threshold (-150 HU: fat, muscle, organs, bone).
2. A 3 x 3 opening (erosion, then dilation) drops everything thinner than ~3 pixels (~10 mm): table
   shells, sheets, cables.
3. Of what remains, the connected components of at least ``MIN_SHARE`` of the largest one's area are the
   body (torso, arms, both legs), unless a component is flat and wide (at most ``FLAT_MAX_MM`` high and
   ``FLAT_RATIO`` times as wide as high): a solid table top.
4. A 3 x 3 dilation restores the eroded rim, within ``above``; enclosed holes (the lungs, the airway,
   bowel gas) are filled.

Nothing is removed when no component survives the opening (an empty slice, a tiny crop): the slice is
then left as it is. Cost on the 2-vCPU development machine: ~0.35 ms per 128 x 128 slice, which takes
the whole resample of a 512 x 512 slice from 0.39 to 0.79 ms (scipy's connected-component labelling, twice;
numpy shifts for the morphology), and ~0.2 s to import scipy.ndimage once per process.
"""

from __future__ import annotations

import numpy as np

__all__ = ["body_mask", "clear_outside_body", "load_labeller"]

#: A component of the eroded mask is body when its area is at least this share of the largest one's.
MIN_SHARE = 0.05
#: A component at most this high (mm) and ``FLAT_RATIO`` times as wide as high is a table top, not body.
FLAT_MAX_MM = 16.0
FLAT_RATIO = 4.0


def _erode(mask: np.ndarray) -> np.ndarray:
    """3 x 3 erosion, as a 1 x 3 then a 3 x 1 one; pixels on the image border erode (outside counts as
    background)."""
    rows = np.zeros_like(mask)
    rows[:, 1:-1] = mask[:, :-2] & mask[:, 1:-1] & mask[:, 2:]
    out = np.zeros_like(mask)
    out[1:-1] = rows[:-2] & rows[1:-1] & rows[2:]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3 x 3 dilation, as a 1 x 3 then a 3 x 1 one."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    out = rows.copy()
    out[1:] |= rows[:-1]
    out[:-1] |= rows[1:]
    return out


def load_labeller() -> None:
    """Import scipy's connected-component labelling now (~0.2 s): a process that forks readers calls it
    first, so that each reader does not import it again."""
    from scipy import ndimage  # noqa: F401


def body_mask(hu: np.ndarray, threshold_hu: float, pixel_mm: float) -> np.ndarray | None:
    """Boolean (S, S) mask of the body in the resampled HU slice ``hu``, holes filled; None when no part of
    the slice is thick enough to be body (then nothing should be cleared)."""
    from scipy import ndimage  # imported here: only the processes that preprocess pay for it

    above = hu > threshold_hu
    labels, n = ndimage.label(_dilate(_erode(above)))  # an opening: pieces 1-2 pixels apart stay one
    if n == 0:
        return None
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    largest = areas.max()
    keep = areas >= max(1, MIN_SHARE * largest)
    if np.count_nonzero(keep) > 1:  # a flat, wide component beside the largest is a table top
        flat_px = FLAT_MAX_MM / pixel_mm
        for i, box in enumerate(ndimage.find_objects(labels), start=1):
            if keep[i] and box is not None and areas[i] < largest:
                height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
                if height <= flat_px and width >= FLAT_RATIO * height:
                    keep[i] = False
    body = _dilate(keep[labels]) & above
    outside, n_outside = ndimage.label(~body)
    inside = np.ones(n_outside + 1, dtype=bool)  # label 0 is the body itself
    inside[np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])] = False
    inside[0] = True
    return inside[outside]


def clear_outside_body(hu: np.ndarray, threshold_hu: float, pixel_mm: float, pad_hu: float) -> np.ndarray:
    """``hu`` with every pixel outside :func:`body_mask` set to ``pad_hu`` (in place; also returned)."""
    mask = body_mask(hu, threshold_hu, pixel_mm)
    if mask is not None:
        hu[~mask] = pad_hu
    return hu
