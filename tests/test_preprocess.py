"""The one preprocessing: physical scale, body centring, windows, unknown spacing, batch = singles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dicomnode.classification.imaging.pixels import read_hu
from dicomnode.classification.imaging.preprocess import (
    PreprocessParams,
    effective_spacing,
    preprocess_batch,
    preprocess_slice,
    resample_hu,
)
from tests.conftest import CT_FIXTURES, SHARED_DATA

SLICE = CT_FIXTURES / "series" / "dcmqi_ge_3slice" / "01.dcm"


@pytest.fixture(scope="module")
def real_slice() -> tuple[np.ndarray, tuple[float, float]]:
    hu, spacing = read_hu(SLICE)
    assert spacing is not None
    return hu, spacing


def _body_mask(x: np.ndarray) -> np.ndarray:
    # channel 0 is the soft-tissue window (-175..275): body > about -150 HU
    return x[0] > (25 / 450)


def test_params_round_trip_and_validation():
    p = PreprocessParams(size=96, pixel_mm=4.0, windows=((-175, 275), (-1000, 200)))
    d = p.to_dict()
    assert d["windows"] == [[-175.0, 275.0], [-1000.0, 200.0]]
    assert PreprocessParams.from_dict(d) == p
    assert p.channels == 2
    with pytest.raises(ValueError, match="high > low"):
        PreprocessParams(windows=((100, 0),))
    with pytest.raises(ValueError, match="pixel_mm"):
        PreprocessParams(pixel_mm=0)
    with pytest.raises(ValueError, match="unknown keys"):
        PreprocessParams.from_dict({"size": 64, "zoom": 2})


def test_shape_range_and_rejects_non_2d(real_slice):
    hu, spacing = real_slice
    p = PreprocessParams()
    x = preprocess_slice(hu, spacing, p)
    assert x.shape == (3, 128, 128) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert _body_mask(x).sum() > 1000  # an abdomen, not an empty crop
    with pytest.raises(ValueError, match="2-D"):
        preprocess_slice(np.zeros((2, 8, 8)), spacing, p)


def test_same_anatomy_same_scale_whatever_the_pixel_size(real_slice):
    """A slice downsampled 2x with its spacing doubled gives the same input (physical resampling)."""
    hu, spacing = real_slice
    p = PreprocessParams()
    a = preprocess_slice(hu, spacing, p)
    h2 = F.avg_pool2d(torch.from_numpy(hu)[None, None], 2)[0, 0].numpy()
    b = preprocess_slice(h2, (spacing[0] * 2, spacing[1] * 2), p)
    ma, mb = _body_mask(a), _body_mask(b)
    assert abs(int(ma.sum()) - int(mb.sum())) < 0.03 * ma.sum()
    assert (ma & mb).sum() > 0.95 * ma.sum()
    assert np.abs(a - b).mean() < 0.02
    # the plain rescale the paper used would not: the same 2x image read as if its pixels were unchanged
    c = preprocess_slice(h2, spacing, p)
    assert _body_mask(c).sum() < 0.4 * ma.sum()


def test_body_is_centred(real_slice):
    """Moving the patient in the field of view does not move them in the input."""
    hu, spacing = real_slice
    p = PreprocessParams()
    a = preprocess_slice(hu, spacing, p)
    shifted = np.full((hu.shape[0] + 120, hu.shape[1] + 80), -1024.0, dtype=np.float32)
    shifted[120:, 80:] = hu
    b = preprocess_slice(shifted, spacing, p)
    ma, mb = _body_mask(a), _body_mask(b)
    assert (ma & mb).sum() > 0.95 * ma.sum()
    rows, cols = np.nonzero(ma)
    assert abs(rows.mean() - 63.5) < 4 and abs(cols.mean() - 63.5) < 4


def test_unknown_spacing_uses_documented_fallback(real_slice):
    hu, _ = real_slice
    p = PreprocessParams(fallback_fov_mm=400.0)
    assert effective_spacing(hu.shape, None, p) == (400.0 / max(hu.shape),) * 2
    assert effective_spacing(hu.shape, (0.0, 0.7), p) == (400.0 / max(hu.shape),) * 2
    s = 400.0 / max(hu.shape)
    assert np.array_equal(preprocess_slice(hu, None, p), preprocess_slice(hu, (s, s), p))


def test_eight_bit_soft_tissue_png_centres(real_slice):
    """An 8-bit soft-tissue-window key slice (air clipped to -175 HU) still finds and centres the body."""
    from PIL import Image

    png = next((SHARED_DATA / "extra" / "png8" / "deeplesion_ssbr").glob("*.png"), None)
    if png is None:
        pytest.skip("shared data extra/png8 not available")
    v = np.asarray(Image.open(png).convert("L")).astype(np.float32)
    hu = -175.0 + v * 450.0 / 255.0
    x = preprocess_slice(hu, None, PreprocessParams())
    rows, cols = np.nonzero(_body_mask(x))
    assert len(rows) > 2000
    assert abs(rows.mean() - 63.5) < 12 and abs(cols.mean() - 63.5) < 12


def test_batch_equals_singles_and_mixed_sizes(real_slice):
    hu, spacing = real_slice
    p = PreprocessParams(size=64, pixel_mm=6.4)
    small = hu[100:400, 50:450]
    batch = preprocess_batch([(hu, spacing), (small, spacing), (hu.astype(np.int16), None)], p)
    assert batch.shape == (3, 3, 64, 64)
    assert np.allclose(batch[0], preprocess_slice(hu, spacing, p))
    assert np.allclose(batch[1], preprocess_slice(small, spacing, p))
    assert preprocess_batch([], p).shape == (0, 3, 64, 64)


def test_windows_map_hu_linearly(real_slice):
    hu, spacing = real_slice
    p = PreprocessParams(windows=((-1000.0, 1000.0),))
    r = resample_hu(hu, spacing, p)
    x = preprocess_slice(hu, spacing, p)
    assert np.allclose(x[0], np.clip((r + 1000.0) / 2000.0, 0, 1), atol=1e-6)
