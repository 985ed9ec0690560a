"""Data augmentation after Roth et al. 2015: random translation, rotation and thin-plate-spline deformation.

Everything runs batched in torch, on the device of the images (a GPU when there is one). One sampling
grid is built per image and applied with a single ``grid_sample`` call:

    output(p) = input(A(p + U(p)))

where ``p`` are normalised output coordinates in [-1, 1] (``align_corners=False``), ``U`` is a
thin-plate-spline displacement field interpolating random displacements of a regular ``K x K`` grid of
control points (radial basis ``phi(r) = r^2 log r``) and ``A`` a random rotation about the image centre
followed by a random translation.

Physical plausibility: displacements are bounded (every control point moves at most
``max_displacement`` of the image width, and the dense field is scaled down if the spline overshoots
that bound between control points), and ``max_displacement`` must stay below a third of the control
point spacing, which keeps the warp free of folds (positive Jacobian). Rotation is bounded by
``max_rotation_deg`` and translation by ``max_shift`` (fraction of the image width). Out-of-image
samples repeat the border value (air around the body after preprocessing).

The number of augmented copies per class follows the paper: ``N_aug = N x N_t x N_r x N_d``, with
``N_t``, ``N_r`` and ``N_d`` chosen per class by :func:`plan_class_multipliers` so that scarce classes
get more copies and the classes end up balanced.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """Bounds of the random transforms. Lengths are fractions of the image width.

    - ``max_shift``: translation in x and y drawn uniformly in [-max_shift, max_shift] x width.
    - ``max_rotation_deg``: rotation drawn uniformly in [-max, max] degrees about the image centre.
    - ``grid_k``: control points per side of the regular TPS grid (K x K points spanning the image).
    - ``max_displacement``: each control point moves by a random vector of length at most this
      (uniform in a disc); must be < 1/3 of the control point spacing 1/(K-1) so the warp cannot fold.
    - ``padding_mode``: ``grid_sample`` padding for samples from outside the image (``border`` repeats
      the air around the body; ``zeros`` fills 0).
    """

    max_shift: float = 0.06
    max_rotation_deg: float = 10.0
    grid_k: int = 5
    max_displacement: float = 0.03
    padding_mode: str = "border"

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift <= 0.5:
            raise ValueError(f"AugmentParams.max_shift must be in [0, 0.5] (fraction of the width), got {self.max_shift}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"AugmentParams.max_rotation_deg must be in [0, 180], got {self.max_rotation_deg}")
        if self.grid_k < 2:
            raise ValueError(f"AugmentParams.grid_k must be at least 2 control points per side, got {self.grid_k}")
        if self.max_displacement < 0:
            raise ValueError(f"AugmentParams.max_displacement must be >= 0, got {self.max_displacement}")
        spacing = 1.0 / (self.grid_k - 1)
        if self.max_displacement >= spacing / 3.0:
            raise ValueError(
                f"AugmentParams.max_displacement={self.max_displacement} is too large for grid_k={self.grid_k}: "
                f"it must be below a third of the control point spacing ({spacing / 3.0:.4f}) to keep the "
                "deformation free of folds")
        if self.padding_mode not in ("border", "zeros", "reflection"):
            raise ValueError(f"AugmentParams.padding_mode must be border, zeros or reflection, got {self.padding_mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "AugmentParams":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"AugmentParams: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**dict(d))


# ---------------------------------------------------------------------------------------------------
# Thin-plate spline


def control_points(k: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The regular ``k x k`` grid of control points in normalised coordinates, shape (k*k, 2) as (x, y)."""
    lin = torch.linspace(-1.0, 1.0, k, dtype=torch.float64)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).to(device=device, dtype=dtype)


def _phi_sq(r2: torch.Tensor) -> torch.Tensor:
    """TPS radial basis phi(r) = r^2 log r written in r^2: 0.5 r^2 log r^2, with phi(0) = 0."""
    return torch.where(r2 > 0, 0.5 * r2 * torch.log(r2.clamp_min(1e-30)), torch.zeros_like(r2))


def _output_coords(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Pixel centres of a size x size image in normalised coordinates (align_corners=False), (size*size, 2)."""
    lin = (torch.arange(size, dtype=dtype) * 2.0 + 1.0) / size - 1.0
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


@lru_cache(maxsize=16)
def _tps_operator(size: int, k: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The linear map from control point displacements (k*k, 2) to the dense field (size*size, 2).

    Solves the TPS system [[Phi, P], [P^T, 0]] [w; a] = [v; 0] once for the regular grid and folds it
    with the basis evaluated at every pixel: field = M @ v with M = [Phi(p, c), P(p)] @ L^-1[:, :n].
    """
    c = control_points(k, dtype=torch.float64)
    n = c.shape[0]
    d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    p_mat = torch.cat([torch.ones(n, 1, dtype=torch.float64), c], dim=1)
    system = torch.zeros(n + 3, n + 3, dtype=torch.float64)
    system[:n, :n] = _phi_sq(d2)
    system[:n, n:] = p_mat
    system[n:, :n] = p_mat.T
    inv = torch.linalg.inv(system)[:, :n]  # (n+3, n): maps values v to [w; a]
    pts = _output_coords(size)
    r2 = ((pts[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    basis = torch.cat([_phi_sq(r2), torch.ones(pts.shape[0], 1, dtype=torch.float64), pts], dim=1)
    return (basis @ inv).to(device=device, dtype=dtype)  # (size*size, n)


def tps_displacement_field(displacements: torch.Tensor, size: int, grid_k: int) -> torch.Tensor:
    """Dense TPS displacement field from control point displacements.

    ``displacements``: (N, K*K, 2) in normalised units (x, y; 2.0 = image width). Returns (N, size, size, 2)
    with ``field[n, i, j]`` the displacement at output row i, column j. The spline interpolates the
    control points exactly and is zero everywhere when all displacements are zero.
    """
    if displacements.ndim != 3 or displacements.shape[1:] != (grid_k * grid_k, 2):
        raise ValueError(f"displacements must have shape (N, {grid_k * grid_k}, 2), got {tuple(displacements.shape)}")
    op = _tps_operator(size, grid_k, str(displacements.device), displacements.dtype)
    field = torch.einsum("pc,ncd->npd", op, displacements)
    return field.reshape(displacements.shape[0], size, size, 2)


# ---------------------------------------------------------------------------------------------------
# Random parameters


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device, dtype=torch.float32) * (high - low) + low


def random_control_displacements(n: int, generator: torch.Generator, params: AugmentParams) -> torch.Tensor:
    """(n, K*K, 2) random control point displacements, uniform in a disc of radius max_displacement (normalised)."""
    k2 = params.grid_k * params.grid_k
    radius = torch.sqrt(_uniform(generator, (n, k2), 0.0, 1.0)) * (2.0 * params.max_displacement)
    angle = _uniform(generator, (n, k2), 0.0, 2.0 * math.pi)
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


def random_affine(n: int, generator: torch.Generator, params: AugmentParams) -> torch.Tensor:
    """(n, 2, 3) random rotation + translation matrices acting on normalised (x, y) coordinates."""
    ang = _uniform(generator, (n,), -params.max_rotation_deg, params.max_rotation_deg) * (math.pi / 180.0)
    shift = _uniform(generator, (n, 2), -params.max_shift, params.max_shift) * 2.0
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n, 2, 3, device=ang.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = shift
    return theta


def _bound_field(field: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's field down so that no displacement is longer than ``max_norm``."""
    if max_norm <= 0:
        return torch.zeros_like(field)
    longest = field.norm(dim=-1).flatten(1).amax(dim=1)
    scale = torch.clamp(max_norm / longest.clamp_min(1e-12), max=1.0)
    return field * scale[:, None, None, None]


def sampling_grid(n: int, size: int, generator: torch.Generator, params: AugmentParams,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(n, size, size, 2) ``grid_sample`` grids of random transforms (TPS, then rotation and translation)."""
    device = torch.device(device) if device is not None else generator.device
    disp = random_control_displacements(n, generator, params).to(device)
    theta = random_affine(n, generator, params).to(device)
    field = _bound_field(tps_displacement_field(disp, size, params.grid_k), 2.0 * params.max_displacement)
    base = _output_coords(size, torch.float32).to(device).reshape(1, size, size, 2)
    q = base + field  # (n, S, S, 2)
    return torch.einsum("nij,nhwj->nhwi", theta[:, :, :2], q) + theta[:, None, None, :, 2]


def warp(images: torch.Tensor, grid: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Resample ``images`` (N, C, S, S) at ``grid`` (N, S, S, 2), bilinear."""
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode=padding_mode,
                         align_corners=False)


def augment_batch(images: torch.Tensor, generator: torch.Generator, params: AugmentParams) -> torch.Tensor:
    """Apply an independent random translation, rotation and TPS deformation to every image.

    ``images``: (N, C, S, S) float tensor on any device; random numbers come from ``generator`` (on its
    own device, so a CPU generator gives the same result on CPU and GPU up to float rounding). Returns a
    new tensor of the same shape, dtype and device.
    """
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"augment_batch expects square images of shape (N, C, S, S), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"augment_batch expects a float tensor, got {images.dtype}")
    n, size = images.shape[0], images.shape[2]
    if n == 0:
        return images.clone()
    grid = sampling_grid(n, size, generator, params, device=images.device)
    return warp(images, grid, params.padding_mode)


# ---------------------------------------------------------------------------------------------------
# Field of view, flips and 8-bit-like intensities (on body-centred HU slices, before the windows)


@dataclass(frozen=True)
class FieldParams:
    """Probabilities and bounds of the HU-level augmentations of :func:`augment_field_of_view`.

    - ``crop_prob``: fraction of slices cut to a random field of view: a rectangle centred on a random body
      pixel, each half-side uniform in [``crop_min``, ``crop_max``] pixels; everything outside becomes air
      and the slice is re-centred on what stays of the body, as the node's preprocessing would centre a
      partial field-of-view reconstruction (one hip, one leg, a cut-off side of an off-centre patient).
      Only slices drawn for ``crop_classes`` are cropped: partial fields of view are a lower-body matter
      (one hip, one leg), and a small crop of a chest slice looks like a neck, which would teach the net
      to doubt the neck at the lung apex.
    - ``flip_prob``: fraction of slices flipped left-right (a one-hip crop may be either hip).
    - ``quantize_prob``: fraction of slices quantised to 256 grey levels over -1024..3071 HU, as the 8-bit
      JPEG key slices are (16 HU steps).
    - ``kernel_prob``: fraction of slices given another apparent reconstruction kernel and resolution:
      half of them blurred by a Gaussian of sigma uniform in [0.3, ``blur_sigma_max``] pixels (a softer
      kernel, a coarser grid such as OpenKBP's 4-5 mm), half sharpened by an unsharp mask of amount
      uniform in [0.2, ``sharpen_max``] (a bone kernel). Most head, neck and lung slices come from one
      coarse grid and most lower-body slices from full-resolution sources, so without this the net can
      read the source's sharpness as the region: the model of 2026-12-02 called 17 of 25 real neck slices
      of ``ct/`` pelvis after a blur of 1.3x the pixel size, and 30 of 100 slices were wrong after a
      mild sharpening.
    """

    crop_prob: float = 0.3
    crop_classes: tuple[str, ...] = ("liver", "pelvis", "legs")
    crop_min: int = 14
    crop_max: int = 64
    flip_prob: float = 0.5
    quantize_prob: float = 0.1
    kernel_prob: float = 0.4
    blur_sigma_max: float = 1.2
    sharpen_max: float = 1.0
    body_threshold_hu: float = -150.0

    def __post_init__(self) -> None:
        for name in ("crop_prob", "flip_prob", "quantize_prob", "kernel_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FieldParams.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.crop_min <= self.crop_max:
            raise ValueError(f"FieldParams: need 1 <= crop_min <= crop_max, got {self.crop_min}, {self.crop_max}")
        if not 0.3 <= self.blur_sigma_max <= 4.0:
            raise ValueError(f"FieldParams.blur_sigma_max must be in [0.3, 4] pixels, got {self.blur_sigma_max}")
        if not 0.2 <= self.sharpen_max <= 3.0:
            raise ValueError(f"FieldParams.sharpen_max must be in [0.2, 3], got {self.sharpen_max}")

    def to_dict(self) -> dict:
        return asdict(self)


def _recentre(hu: torch.Tensor, threshold: float, pad_hu: float) -> torch.Tensor:
    """Shift one (S, S) HU slice (whole pixels, air fills) so that its body centroid sits at the centre."""
    mask = hu > threshold
    if not bool(mask.any()):
        return hu
    size_r, size_c = hu.shape
    rows, cols = mask.nonzero(as_tuple=True)
    dr = int(round((size_r - 1) / 2.0 - float(rows.float().mean())))
    dc = int(round((size_c - 1) / 2.0 - float(cols.float().mean())))
    out = torch.full_like(hu, pad_hu)
    src_r = slice(max(0, -dr), size_r - max(0, dr))
    dst_r = slice(max(0, dr), size_r - max(0, -dr))
    src_c = slice(max(0, -dc), size_c - max(0, dc))
    dst_c = slice(max(0, dc), size_c - max(0, -dc))
    out[dst_r, dst_c] = hu[src_r, src_c]
    return out


def random_fov_crop(hu: torch.Tensor, which: torch.Tensor, generator: torch.Generator, params: FieldParams,
                    pad_hu: float) -> torch.Tensor:
    """Cut the slices flagged in ``which`` (bool (N,)) of ``hu`` (N, S, S) to a random field of view.

    See :class:`FieldParams`. Returns a new tensor; slices without body pixels stay as they are.
    """
    out = hu.clone()
    size = hu.shape[-1]
    rr = torch.arange(hu.shape[-2])[:, None]
    cc = torch.arange(size)[None, :]
    for i in which.nonzero().flatten().tolist():
        body = (hu[i] > params.body_threshold_hu).nonzero()
        if len(body) == 0:
            continue
        pick = int(torch.randint(len(body), (1,), generator=generator))
        r0, c0 = (int(v) for v in body[pick])
        hr, hc = (int(v) for v in torch.randint(params.crop_min, params.crop_max + 1, (2,), generator=generator))
        inside = (rr - r0).abs().le(hr) & (cc - c0).abs().le(hc)
        out[i] = _recentre(torch.where(inside, hu[i], torch.full_like(hu[i], pad_hu)), params.body_threshold_hu,
                           pad_hu)
    return out


def quantize_8bit(hu: torch.Tensor, low: float = -1024.0, high: float = 3071.0) -> torch.Tensor:
    """HU rounded to 256 levels over ``low..high`` (and clipped to it), as an 8-bit full-range JPEG holds."""
    step = (high - low) / 255.0
    return (torch.round((hu.clamp(low, high) - low) / step) * step + low).to(hu.dtype)


def gaussian_blur(hu: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each slice of HU (N, S, S) blurred by a separable Gaussian of its own ``sigmas[i]`` pixels (N,).

    The border value repeats outside the image (air around a body-centred slice)."""
    n = hu.shape[0]
    radius = max(1, int(math.ceil(3.0 * float(sigmas.max()))))
    t = torch.arange(-radius, radius + 1, dtype=hu.dtype, device=hu.device)
    k = torch.exp(-0.5 * (t[None, :] / sigmas.to(hu)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    x = F.pad(hu[None], (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, k[:, None, None, :], groups=n)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, k[:, None, :, None], groups=n)[0]


def random_kernel(hu: torch.Tensor, which: torch.Tensor, generator: torch.Generator,
                  params: FieldParams) -> torch.Tensor:
    """The slices flagged in ``which`` (bool (N,)) of float HU (N, S, S) blurred or sharpened at random.

    See ``FieldParams.kernel_prob``: a blur of sigma in [0.3, ``blur_sigma_max``] pixels, or an unsharp
    mask ``x + a (x - blur(x))`` with ``a`` in [0.2, ``sharpen_max``], each for half of them."""
    sel = which.nonzero().flatten()
    if len(sel) == 0:
        return hu
    n = len(sel)
    sigma = _uniform(generator, (n,), 0.3, params.blur_sigma_max)
    amount = _uniform(generator, (n,), 0.2, params.sharpen_max)
    sharpen = torch.rand(n, generator=generator) < 0.5
    x = hu[sel]
    blurred = gaussian_blur(x, sigma)
    sharpened = x + amount.to(x)[:, None, None] * (x - blurred)
    out = hu.clone()
    out[sel] = torch.where(sharpen[:, None, None].to(x.device), sharpened, blurred)
    return out


def augment_field_of_view(hu: torch.Tensor, generator: torch.Generator, params: FieldParams,
                          pad_hu: float = -1024.0, croppable: torch.Tensor | None = None) -> torch.Tensor:
    """Random field-of-view crops, left-right flips, kernels (:func:`random_kernel`) and 8-bit quantisation
    of body-centred HU (N, S, S).

    ``croppable`` (bool (N,)): the slices that may be cropped (drawn for one of ``params.crop_classes``);
    None: all of them.
    """
    if hu.ndim != 3:
        raise ValueError(f"augment_field_of_view expects HU slices (N, S, S), got {tuple(hu.shape)}")
    n = hu.shape[0]
    x = hu
    if params.crop_prob > 0:
        crop = torch.rand(n, generator=generator) < params.crop_prob
        if croppable is not None:
            crop &= croppable
        if bool(crop.any()):
            x = random_fov_crop(x, crop, generator, params, pad_hu)
    if params.flip_prob > 0:
        flip = torch.rand(n, generator=generator) < params.flip_prob
        if bool(flip.any()):
            x = x.clone()
            x[flip] = x[flip].flip(-1)
    if params.kernel_prob > 0 and x.is_floating_point():
        kern = torch.rand(n, generator=generator) < params.kernel_prob
        if bool(kern.any()):
            x = random_kernel(x, kern, generator, params)
    if params.quantize_prob > 0:
        q = torch.rand(n, generator=generator) < params.quantize_prob
        if bool(q.any()):
            x = x.clone() if x is hu else x
            x[q] = quantize_8bit(x[q])
    return x


# ---------------------------------------------------------------------------------------------------
# Class balancing (N_aug = N x N_t x N_r x N_d)


@dataclass(frozen=True)
class ClassPlan:
    """Augmentation multipliers of one class: ``n_aug = n x n_t x n_r x n_d``."""

    n: int
    n_t: int
    n_r: int
    n_d: int

    @property
    def factor(self) -> int:
        return self.n_t * self.n_r * self.n_d

    @property
    def n_aug(self) -> int:
        return self.n * self.factor

    def to_dict(self) -> dict:
        return {"n": self.n, "n_t": self.n_t, "n_r": self.n_r, "n_d": self.n_d, "factor": self.factor,
                "n_aug": self.n_aug}


def _split_factor(target: int) -> tuple[int, int, int]:
    """Smallest balanced (n_t, n_r, n_d) whose product reaches ``target``; deformations grow first."""
    t = r = d = 1
    while t * r * d < target:
        if d <= r and d <= t:
            d += 1
        elif r <= t:
            r += 1
        else:
            t += 1
    return t, r, d


def plan_class_multipliers(class_counts: Mapping[str, int], target: int | None = None,
                           max_factor: int = 64) -> dict[str, ClassPlan]:
    """Choose N_t, N_r, N_d per class so that every class reaches about the same number of samples.

    ``target`` is the number of (augmented) samples wanted per class, by default the count of the largest
    class; a class needs a factor ceil(target / N), capped at ``max_factor`` (a handful of slices of one
    patient should not be copied a thousand times), split into balanced integers with deformations first.
    Classes with 0 samples get a plan with factor 1 and n_aug 0 (the caller decides whether that is an error).
    """
    if not class_counts:
        raise ValueError("plan_class_multipliers: no classes given")
    for name, count in class_counts.items():
        if count < 0:
            raise ValueError(f"plan_class_multipliers: class {name!r} has a negative count {count}")
    if max_factor < 1:
        raise ValueError(f"plan_class_multipliers: max_factor must be >= 1, got {max_factor}")
    goal = target if target is not None else max(class_counts.values())
    plans: dict[str, ClassPlan] = {}
    for name, count in class_counts.items():
        need = 1 if count == 0 else min(max_factor, max(1, math.ceil(goal / count)))
        t, r, d = _split_factor(need)
        plans[name] = ClassPlan(n=int(count), n_t=t, n_r=r, n_d=d)
    return plans


# ---------------------------------------------------------------------------------------------------
# Figure (paper Fig. 4)


def _grid_image(size: int, lines: int) -> torch.Tensor:
    img = torch.zeros(size, size)
    step = max(size // lines, 2)
    for i in range(step // 2, size, step):
        img[i, :] = 1.0
        img[:, i] = 1.0
    return img


def plot_deformations(image: np.ndarray | torch.Tensor, out_path: str | Path, params: AugmentParams | None = None,
                      n: int = 5, seed: int = 0, deformation_only: bool = True, title: str | None = None) -> Path:
    """Save a figure of one image under ``n`` random deformations with the deformed grid drawn (paper Fig. 4).

    ``image``: (S, S) or (C, S, S); channel 0 is shown. With ``deformation_only`` the translation and
    rotation are turned off so the panels show the TPS warp alone, with the control points marked at their
    displaced positions. Returns the path written (PNG, or whatever suffix matplotlib understands).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = params or AugmentParams()
    if deformation_only:
        params = AugmentParams(**{**params.to_dict(), "max_shift": 0.0, "max_rotation_deg": 0.0})
    img = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    if img.ndim == 3:
        img = img[0]
    if img.ndim != 2 or img.shape[0] != img.shape[1]:
        raise ValueError(f"plot_deformations expects a square (S, S) or (C, S, S) image, got {tuple(img.shape)}")
    size = img.shape[0]
    gen = torch.Generator().manual_seed(seed)
    grid_img = _grid_image(size, 2 * (params.grid_k - 1))
    stack = torch.stack([img, grid_img])[None].repeat(n, 1, 1, 1)
    disp = random_control_displacements(n, gen, params)
    theta = random_affine(n, gen, params)
    field = _bound_field(tps_displacement_field(disp, size, params.grid_k), 2.0 * params.max_displacement)
    base = _output_coords(size, torch.float32).reshape(1, size, size, 2)
    grid = torch.einsum("nij,nhwj->nhwi", theta[:, :, :2], base + field) + theta[:, None, None, :, 2]
    warped = warp(stack, grid, params.padding_mode)
    ctrl = control_points(params.grid_k)
    lo, hi = float(img.min()), float(img.max())
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * (n + 1), 2.9))
    panels = [(img, grid_img, None)] + [(warped[i, 0], warped[i, 1], disp[i]) for i in range(n)]
    for i, (ax, (im, gr, d)) in enumerate(zip(axes, panels)):
        ax.imshow(im.numpy(), cmap="gray", vmin=lo, vmax=hi)
        overlay = np.ma.masked_less(gr.numpy(), 0.3)
        ax.imshow(overlay, cmap="autumn", alpha=0.6, vmin=0, vmax=1)
        # Output position of control point c is where the backward map takes c - d (to first order).
        if deformation_only or d is None:  # (with rotation and translation the grid alone shows the warp)
            pts = ctrl if d is None else ctrl - d
            px = (pts.numpy() + 1.0) * size / 2.0 - 0.5
            ax.plot(px[:, 0], px[:, 1], "c.", markersize=4)
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
        ax.set_title("original" if i == 0 else f"deformation {i}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title or f"thin-plate-spline deformations: {params.grid_k}x{params.grid_k} control points, "
                          f"max displacement {params.max_displacement:.0%} of the width", fontsize=9)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def jacobian_determinant(grid: torch.Tensor) -> torch.Tensor:
    """Finite-difference Jacobian determinant of sampling grids (N, S, S, 2) in normalised units.

    Used to check plausibility: a fold-free warp has a positive determinant everywhere.
    """
    dx = grid[:, :, 1:, :] - grid[:, :, :-1, :]
    dy = grid[:, 1:, :, :] - grid[:, :-1, :, :]
    dx, dy = dx[:, :-1], dy[:, :, :-1]
    return dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0]


__all__: Sequence[str] = [
    "AugmentParams", "ClassPlan", "FieldParams", "augment_batch", "augment_field_of_view", "quantize_8bit",
    "random_fov_crop", "control_points", "jacobian_determinant", "plan_class_multipliers",
    "plot_deformations", "random_affine", "random_control_displacements", "sampling_grid", "tps_displacement_field",
    "warp",
]
