"""Augmentation: TPS identity and bounds, determinism, shapes, class plans, the Fig. 4 figure."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch

from tests.conftest import CT_FIXTURES
from trainer.augment import (
    AugmentParams,
    _output_coords,
    augment_batch,
    jacobian_determinant,
    plan_class_multipliers,
    plot_deformations,
    sampling_grid,
    tps_displacement_field,
)


@pytest.fixture(scope="module")
def ct_batch() -> torch.Tensor:
    """A real 128x128 CT slice (pydicom's CT_small), windowed to [0, 1], as a batch of 4."""
    ds = pydicom.dcmread(CT_FIXTURES / "slices" / "pydicom_ct_small.dcm")
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = np.clip((hu + 175.0) / 450.0, 0.0, 1.0)
    return torch.from_numpy(img)[None, None].repeat(4, 1, 1, 1)


def test_zero_displacement_is_identity(ct_batch):
    params = AugmentParams(max_shift=0.0, max_rotation_deg=0.0, max_displacement=0.0)
    out = augment_batch(ct_batch, torch.Generator().manual_seed(3), params)
    assert torch.allclose(out, ct_batch, atol=1e-5)
    zero = tps_displacement_field(torch.zeros(2, 25, 2), 64, 5)
    assert zero.shape == (2, 64, 64, 2) and float(zero.abs().max()) == 0.0


def test_tps_reproduces_affine_displacements():
    """A thin-plate spline reproduces affine functions exactly (the P block of the system)."""
    from trainer.augment import control_points

    c = control_points(4, dtype=torch.float64)
    disp = (0.03 + 0.02 * c[:, :1] - 0.01 * c[:, 1:]).repeat(1, 2)[None]  # affine in x, y
    field = tps_displacement_field(disp, 32, 4)
    pts = _output_coords(32).reshape(32, 32, 2)
    expected = (0.03 + 0.02 * pts[..., :1] - 0.01 * pts[..., 1:]).repeat(1, 1, 2)
    assert torch.allclose(field[0], expected, atol=1e-9)


def test_tps_deformation_is_not_affine_and_changes_the_image(ct_batch):
    params = AugmentParams(max_shift=0.0, max_rotation_deg=0.0, max_displacement=0.05, grid_k=4)
    out = augment_batch(ct_batch, torch.Generator().manual_seed(0), params)
    assert float((out - ct_batch).abs().mean()) > 1e-3
    assert not torch.allclose(out[0], out[1])  # every image gets its own deformation


@pytest.mark.parametrize("grid_k,max_disp", [(3, 0.16), (5, 0.08), (7, 0.05)])
def test_displacement_bounded_and_fold_free(grid_k, max_disp):
    params = AugmentParams(max_shift=0.0, max_rotation_deg=0.0, grid_k=grid_k, max_displacement=max_disp)
    size = 64
    grid = sampling_grid(32, size, torch.Generator().manual_seed(7), params)
    base = _output_coords(size, torch.float32).reshape(1, size, size, 2)
    longest = float((grid - base).norm(dim=-1).max())
    assert longest <= 2.0 * max_disp + 1e-6  # normalised units: 2.0 = image width
    assert longest > 0.5 * max_disp  # and it does deform
    assert float(jacobian_determinant(grid).min()) > 0.0


def test_translation_and_rotation_bounded():
    params = AugmentParams(max_shift=0.1, max_rotation_deg=15.0, max_displacement=0.0)
    size = 32
    grid = sampling_grid(200, size, torch.Generator().manual_seed(1), params)
    centre = grid[:, size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1].mean(dim=(1, 2))
    assert float(centre.abs().max()) <= 2 * 0.1 + 1e-5
    # The direction of the row axis gives the rotation angle.
    row = grid[:, size // 2, -1] - grid[:, size // 2, 0]
    angle = torch.rad2deg(torch.atan2(row[:, 1], row[:, 0]))
    assert float(angle.abs().max()) <= 15.0 + 1e-3
    assert float(angle.abs().max()) > 5.0


def test_deterministic_with_seed(ct_batch):
    params = AugmentParams()
    a = augment_batch(ct_batch, torch.Generator().manual_seed(42), params)
    b = augment_batch(ct_batch, torch.Generator().manual_seed(42), params)
    c = augment_batch(ct_batch, torch.Generator().manual_seed(43), params)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_shapes_dtypes_and_bad_input(ct_batch):
    multi = ct_batch.repeat(1, 3, 1, 1)
    out = augment_batch(multi, torch.Generator().manual_seed(0), AugmentParams())
    assert out.shape == multi.shape and out.dtype == multi.dtype
    # all channels of one image get the same warp
    assert torch.allclose(out[:, 0], out[:, 2])
    assert augment_batch(multi[:0], torch.Generator(), AugmentParams()).shape == (0, 3, 128, 128)
    with pytest.raises(ValueError, match="square images"):
        augment_batch(torch.zeros(2, 1, 16, 8), torch.Generator(), AugmentParams())
    with pytest.raises(ValueError, match="float"):
        augment_batch(torch.zeros(2, 1, 16, 16, dtype=torch.int16), torch.Generator(), AugmentParams())


def test_params_validation():
    with pytest.raises(ValueError, match="max_displacement"):
        AugmentParams(grid_k=5, max_displacement=0.2)
    with pytest.raises(ValueError, match="grid_k"):
        AugmentParams(grid_k=1)
    with pytest.raises(ValueError, match="unknown keys"):
        AugmentParams.from_dict({"max_shift": 0.1, "bogus": 1})
    p = AugmentParams(max_shift=0.02)
    assert AugmentParams.from_dict(p.to_dict()) == p


def test_plan_class_multipliers_balances_classes():
    counts = {"neck": 900, "lungs": 3000, "liver": 700, "pelvis": 88, "legs": 12}
    plans = plan_class_multipliers(counts)
    assert plans["lungs"].factor == 1
    for name in ("neck", "liver", "pelvis"):
        p = plans[name]
        assert p.n_aug >= 3000 and p.factor == p.n_t * p.n_r * p.n_d
        assert max(p.n_t, p.n_r, p.n_d) - min(p.n_t, p.n_r, p.n_d) <= 1
    assert plans["legs"].factor == 64  # capped
    assert plans["pelvis"].n_d >= plans["pelvis"].n_t
    assert plan_class_multipliers({"a": 0, "b": 5})["a"].n_aug == 0
    with pytest.raises(ValueError, match="negative"):
        plan_class_multipliers({"a": -1})


def test_plot_deformations_writes_figure(ct_batch, tmp_path):
    out = plot_deformations(ct_batch[0], tmp_path / "fig" / "tps.png", n=3, seed=1)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.fixture(scope="module")
def body_hu() -> torch.Tensor:
    """A real CT slice resampled as the trainer holds it: body-centred HU at 3.2 mm (128 x 128)."""
    from dicomnode.classification.imaging.pixels import read_hu
    from dicomnode.classification.imaging.preprocess import PreprocessParams, resample_hu

    hu, spacing = read_hu(CT_FIXTURES / "slices" / "pydicom_ct_small.dcm")
    return torch.from_numpy(resample_hu(np.asarray(hu, dtype=np.float32), spacing, PreprocessParams()))


def test_fov_crop_keeps_part_of_the_body_recentred_and_air_elsewhere(body_hu):
    from trainer.augment import FieldParams, random_fov_crop

    params = FieldParams(crop_min=4, crop_max=6)  # the fixture body is small at 3.2 mm (about 26 x 20 pixels)
    batch = body_hu[None].repeat(6, 1, 1)
    which = torch.tensor([True, True, True, True, True, False])
    out = random_fov_crop(batch, which, torch.Generator().manual_seed(1), params, -1024.0)
    assert torch.equal(out[5], batch[5])  # unflagged slices untouched
    whole = int((batch[0] > -150).sum())
    for i in range(5):
        body = out[i] > -150
        kept = int(body.sum())
        assert 0 < kept < whole  # a part of the body, not all of it
        rows, cols = body.nonzero(as_tuple=True)
        assert abs(float(rows.float().mean()) - 63.5) <= 1.0 and abs(float(cols.float().mean()) - 63.5) <= 1.0
        assert int(rows.max() - rows.min()) <= 2 * 6 and int(cols.max() - cols.min()) <= 2 * 6
        assert set(out[i][~body].unique().tolist()) <= set(batch[0][batch[0] <= -150].unique().tolist()) | {-1024.0}


def test_field_augment_flips_quantizes_and_is_deterministic(body_hu):
    from trainer.augment import FieldParams, augment_field_of_view, quantize_8bit

    batch = body_hu[None].repeat(8, 1, 1)
    flip_only = FieldParams(crop_prob=0.0, flip_prob=1.0, quantize_prob=0.0, kernel_prob=0.0)
    assert torch.equal(augment_field_of_view(batch, torch.Generator().manual_seed(0), flip_only), batch.flip(-1))
    q = quantize_8bit(batch)
    assert len(q.unique()) <= 256 and float((q - batch.clamp(-1024, 3071)).abs().max()) <= 4095 / 255 / 2 + 1e-3
    mixed = FieldParams(crop_prob=0.5, flip_prob=0.5, quantize_prob=0.5)
    a = augment_field_of_view(batch, torch.Generator().manual_seed(3), mixed)
    b = augment_field_of_view(batch, torch.Generator().manual_seed(3), mixed)
    assert torch.equal(a, b) and a.shape == batch.shape and not torch.equal(a, batch)
    assert torch.equal(batch, body_hu[None].repeat(8, 1, 1))  # the input is not changed in place
    with pytest.raises(ValueError, match="crop_prob"):
        FieldParams(crop_prob=1.5)
    with pytest.raises(ValueError, match=r"\(N, S, S\)"):
        augment_field_of_view(batch[0], torch.Generator(), mixed)


def test_random_kernel_blurs_or_sharpens_flagged_slices_only(body_hu):
    from trainer.augment import FieldParams, augment_field_of_view, gaussian_blur, random_kernel

    batch = body_hu[None].repeat(8, 1, 1)
    # a blur keeps the mean of a slice whose border is air, lowers its high frequencies and spreads an edge
    sig = torch.tensor([0.5, 1.0] + [1.0] * 6)
    blurred = gaussian_blur(batch, sig)
    assert blurred.shape == batch.shape
    assert torch.allclose(blurred.mean((1, 2)), batch.mean((1, 2)), rtol=1e-4)

    def roughness(x: torch.Tensor) -> float:
        return float((x[:, 1:] - x[:, :-1]).abs().mean())

    assert roughness(blurred[1]) < roughness(blurred[0]) < roughness(batch[0])
    impulse = torch.full((1, 15, 15), 0.0)
    impulse[0, 7, 7] = 1.0
    k = gaussian_blur(impulse, torch.tensor([1.0]))[0]
    assert abs(float(k.sum()) - 1.0) < 1e-5 and torch.allclose(k, k.T, atol=1e-7) and torch.allclose(k, k.flip(0))
    assert abs(float(k[7, 8] / k[7, 7]) - float(torch.exp(torch.tensor(-0.5)))) < 1e-4  # sigma 1 pixel
    which = torch.tensor([True, True, True, True, True, True, False, False])
    params = FieldParams()
    out = random_kernel(batch, which, torch.Generator().manual_seed(0), params)
    assert torch.equal(out[6:], batch[6:])  # unflagged slices untouched
    changed = [roughness(out[i]) / roughness(batch[i]) for i in range(6)]
    assert any(r < 0.95 for r in changed) and any(r > 1.05 for r in changed)  # some blurred, some sharpened
    assert torch.equal(batch, body_hu[None].repeat(8, 1, 1))  # the input is not changed in place
    kernel_only = FieldParams(crop_prob=0.0, flip_prob=0.0, quantize_prob=0.0, kernel_prob=1.0)
    a = augment_field_of_view(batch, torch.Generator().manual_seed(4), kernel_only)
    assert torch.equal(a, augment_field_of_view(batch, torch.Generator().manual_seed(4), kernel_only))
    assert all(not torch.equal(a[i], batch[i]) for i in range(8))
    with pytest.raises(ValueError, match="kernel_prob"):
        FieldParams(kernel_prob=-0.1)
    with pytest.raises(ValueError, match="blur_sigma_max"):
        FieldParams(blur_sigma_max=0.1)


def test_only_croppable_slices_are_cropped(body_hu):
    from trainer.augment import FieldParams, augment_field_of_view

    batch = body_hu[None].repeat(4, 1, 1)
    params = FieldParams(crop_prob=1.0, crop_min=3, crop_max=4, flip_prob=0.0, quantize_prob=0.0, kernel_prob=0.0)
    croppable = torch.tensor([True, False, True, False])
    out = augment_field_of_view(batch, torch.Generator().manual_seed(0), params, croppable=croppable)
    assert torch.equal(out[1], batch[1]) and torch.equal(out[3], batch[3])
    assert not torch.equal(out[0], batch[0]) and not torch.equal(out[2], batch[2])
    assert params.crop_classes == ("liver", "pelvis", "legs")
