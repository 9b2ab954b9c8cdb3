"""Random-ellipse phantoms: an extra CT training source with no patient data.

Coordinates follow :mod:`fedrecon.operators.phantoms`: unit coordinates ``[-1, 1]`` span the
image's half-width (``x`` right) and half-height (``y`` up). Each pixel is the mean of
``oversample**2`` sub-samples, so edges are partial-volume averaged like a real scan.
Two kinds of values:

* ``values="unit"``: Shepp-Logan-like additive ellipses (random signs and intensities),
  clipped at 0 and scaled to a maximum of 1 (dimensionless).
* ``values="HU"`` / ``"attenuation_per_mm"``: a body (soft tissue with a subcutaneous fat
  layer, in air) holding ellipses of lung, fat, water, soft tissue, blood and bone painted
  one over another, with their Hounsfield values (or the attenuation those give).

Slices are drawn independently (a "volume" is a stack of unrelated slices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .ct import hu_to_attenuation, write_ct_volume

__all__ = ["TISSUE_HU", "random_ellipses", "write_phantom_volumes"]

# Typical HU ranges (low, high) of tissue classes and their probability inside the body.
TISSUE_HU: dict[str, tuple[float, float, float]] = {
    "lung": (-900.0, -700.0, 0.15),
    "fat": (-120.0, -80.0, 0.2),
    "water": (-5.0, 5.0, 0.1),
    "soft_tissue": (20.0, 80.0, 0.3),
    "blood": (30.0, 60.0, 0.1),
    "bone": (300.0, 1200.0, 0.15),
}
_AIR_HU = -1000.0
_VALUES = ("unit", "HU", "attenuation_per_mm")


def _coverage(shape: tuple[int, int], oversample: int, ellipse: Sequence[float]) -> np.ndarray:
    """Fraction ``(H, W)`` of each pixel inside ellipse ``(a, b, x0, y0, radians)``."""
    h, w = shape
    a, b, x0, y0, phi = ellipse
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    cols = (np.arange(w)[:, None] + sub[None, :]).reshape(-1)
    rows = (np.arange(h)[:, None] + sub[None, :]).reshape(-1)
    xs = (cols - (w - 1) / 2) / (w / 2) - x0
    ys = ((h - 1) / 2 - rows) / (h / 2) - y0
    c, s = math.cos(phi), math.sin(phi)
    u = (xs[None, :] * c + ys[:, None] * s) / a
    v = (-xs[None, :] * s + ys[:, None] * c) / b
    inside = (u * u + v * v <= 1.0).astype(np.float32)
    return inside.reshape(h, oversample, w, oversample).mean(axis=(1, 3))


def _unit_slice(rng: np.random.Generator, shape: tuple[int, int], n: int,
                oversample: int) -> np.ndarray:
    img = np.zeros(shape, dtype=np.float32)
    for _ in range(n):
        ell = (rng.uniform(0.05, 0.6), rng.uniform(0.05, 0.6), rng.uniform(-0.5, 0.5),
               rng.uniform(-0.5, 0.5), rng.uniform(0.0, math.pi))
        value = rng.uniform(0.1, 1.0) * (-1.0 if rng.random() < 0.3 else 1.0)
        img += value * _coverage(shape, oversample, ell)
    img = np.maximum(img, 0.0)
    peak = img.max()
    return img / peak if peak > 0 else img


def _tissue_slice(rng: np.random.Generator, shape: tuple[int, int], n: int,
                  oversample: int) -> np.ndarray:
    names = list(TISSUE_HU)
    probs = np.array([TISSUE_HU[k][2] for k in names])
    img = np.full(shape, _AIR_HU, dtype=np.float32)

    def paint(ell: Sequence[float], hu: float) -> None:
        m = _coverage(shape, oversample, ell)
        img[:] = img * (1.0 - m) + hu * m

    a, b = rng.uniform(0.7, 0.92), rng.uniform(0.5, 0.8)
    tilt = rng.uniform(-0.15, 0.15)
    fat = rng.uniform(0.03, 0.08)
    paint((a, b, 0.0, 0.0, tilt), rng.uniform(*TISSUE_HU["fat"][:2]))
    paint((a - fat, b - fat, 0.0, 0.0, tilt), rng.uniform(*TISSUE_HU["soft_tissue"][:2]))
    for _ in range(n):
        r, t = 0.65 * math.sqrt(rng.random()), rng.uniform(0.0, 2 * math.pi)
        x0, y0 = r * (a - fat) * math.cos(t), r * (b - fat) * math.sin(t)
        # semi-axes small enough to stay mostly inside the body
        room = max(0.05, 1.0 - r)
        ell = (rng.uniform(0.04, 0.35) * room * a, rng.uniform(0.04, 0.35) * room * b,
               x0, y0, rng.uniform(0.0, math.pi))
        lo, hi, _ = TISSUE_HU[names[rng.choice(len(names), p=probs)]]
        paint(ell, rng.uniform(lo, hi))
    return img


def random_ellipses(n: int, image_size: int | Sequence[int], *, seed: int | Sequence[int],
                    n_ellipses: tuple[int, int] = (5, 15), values: str = "unit",
                    oversample: int = 2) -> Tensor:
    """``n`` random ellipse phantoms, float32 ``(n, H, W)``; the same seed gives the same images.

    ``n_ellipses`` is the inclusive range of ellipses per slice (inside the body for the
    tissue values); ``values`` is ``"unit"``, ``"HU"`` or ``"attenuation_per_mm"``.
    """
    if isinstance(image_size, int):
        shape = (image_size, image_size)
    else:
        shape = (int(image_size[0]), int(image_size[1]))
    if n < 0 or min(shape) < 1:
        raise ValueError(f"random_ellipses: need n >= 0 and a positive image_size; got n={n}, "
                         f"image_size={image_size!r}")
    lo, hi = n_ellipses
    if not 0 <= lo <= hi:
        raise ValueError(f"random_ellipses: argument 'n_ellipses' must be (low, high) with "
                         f"0 <= low <= high; got {n_ellipses!r}")
    if values not in _VALUES:
        raise ValueError(f"random_ellipses: argument 'values' must be one of {_VALUES}; "
                         f"got {values!r}")
    if oversample < 1:
        raise ValueError(f"random_ellipses: argument 'oversample' must be >= 1; got {oversample}")
    rng = np.random.default_rng(seed)
    make = _unit_slice if values == "unit" else _tissue_slice
    out = np.stack([make(rng, shape, int(rng.integers(lo, hi + 1)), oversample) for _ in range(n)]
                   ) if n else np.zeros((0, *shape), dtype=np.float32)
    if values == "attenuation_per_mm":
        out = hu_to_attenuation(out)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def write_phantom_volumes(out_dir: str | Path, n_volumes: int, n_slices: int,
                          image_size: int | Sequence[int], seed: int, *,
                          field_of_view: float = 400.0, n_ellipses: tuple[int, int] = (5, 15),
                          overwrite: bool = False) -> list[Path]:
    """Write ``n_volumes`` files ``phantom_0000.h5`` ... of tissue-like phantoms in HU.

    Volume ``i`` depends only on ``(seed, i)``, not on ``n_volumes``; each is its own
    patient. ``field_of_view`` (mm, the width) sets the stored pixel spacing.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    spacing = field_of_view / size[1]
    paths = []
    for i in range(n_volumes):
        hu = random_ellipses(n_slices, size, seed=(int(seed), i), n_ellipses=n_ellipses,
                             values="HU")
        name = f"phantom_{i:04d}"
        paths.append(write_ct_volume(Path(out_dir) / f"{name}.h5", hu, units="HU",
                                     pixel_spacing=spacing, patient_id=f"phantom-{seed}-{i}",
                                     overwrite=overwrite))
    return paths
