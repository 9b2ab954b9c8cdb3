"""Real anatomy shipped inside an installed package, loaded offline: axial brain slices.

Source of the anatomy, in order of preference (``source="auto"``):

``"mni152"``
    The ICBM 2009a symmetric MNI152 T1 template (1 mm, skull-stripped, 197 x 233 x 189,
    uint8) that ships *inside the nilearn wheel*
    (``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, 1.6 MB;
    ``nilearn.datasets.load_mni152_template`` loads the same file). It is located through
    the installed distribution's file list, so nilearn is never imported (its pandas /
    scikit-learn dependencies need not be installed), and read with nibabel.
``"phantom"``
    Analytic modified Shepp-Logan phantoms with random ellipse perturbations; used by
    ``"auto"`` only when the template or nibabel is missing, with a warning that says so.

One subject only, so volumes are made to differ by the slab position, a left-right flip,
small rotations, scales and shifts (``augment``) and the contrast (a lookup table on the
T1 intensity inside the brain mask: ``"t1"``, ``"t2"``, ``"flair"``, ``"pd"``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "ANATOMY_SOURCES",
    "CONTRASTS",
    "FOV_MM",
    "BrainSlices",
    "load_brain_slices",
    "mni152_template_path",
    "resolve_anatomy_source",
]

log = logging.getLogger(__name__)

MNI152_FILE = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
ANATOMY_SOURCES = ("auto", "mni152", "phantom")
FOV_MM = 220.0  # default field of view of the slices (a typical brain protocol)

# Contrast lookup tables on the template's T1 intensity inside the brain (CSF ~0.35,
# grey matter ~0.65, white matter ~0.85 after dividing by 255): (xp, fp) for np.interp.
_T1_XP = (0.0, 0.35, 0.65, 0.87, 1.0)
CONTRASTS: dict[str, tuple[float, ...] | None] = {
    "t1": None,                               # the template as it is
    "t2": (1.0, 0.95, 0.65, 0.40, 0.35),      # CSF bright, white matter dark
    "flair": (0.10, 0.15, 0.80, 0.60, 0.55),  # T2-like with the CSF suppressed
    "pd": (0.60, 0.75, 0.90, 0.80, 0.80),     # flat, grey matter slightly above white
}

Seed = int | Sequence[int] | np.random.SeedSequence | None


class BrainSlices(NamedTuple):
    """Axial slices and the anatomy they came from.

    Attributes
    ----------
    images : np.ndarray
        float32 ``(n, N, N)`` magnitude images in ``[0, 1]``.
    source : str
        ``"mni152"`` or ``"phantom"``: the anatomy actually used.
    """

    images: np.ndarray
    source: str


def mni152_template_path() -> Path | None:
    """The MNI152 T1 template inside the installed nilearn distribution, or ``None``.

    Looks the file up in the distribution's metadata (no import of nilearn).
    """
    try:
        dist = importlib.metadata.distribution("nilearn")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(MNI152_FILE)))
    return path if path.is_file() else None


def resolve_anatomy_source(source: str = "auto") -> str:
    """The anatomy that ``source`` gives on this machine: ``"mni152"`` or ``"phantom"``.

    ``"auto"`` falls back to ``"phantom"`` with a warning when the template or nibabel is
    missing; ``"mni152"`` raises instead.
    """
    if source not in ANATOMY_SOURCES:
        raise ValueError(f"argument 'source' must be one of {ANATOMY_SOURCES}; got {source!r}")
    if source == "phantom":
        return "phantom"
    missing = []
    if mni152_template_path() is None:
        missing.append("the MNI152 template of the nilearn wheel (pip install --no-deps nilearn)")
    if importlib.util.find_spec("nibabel") is None:
        missing.append("nibabel (pip install nibabel)")
    if not missing:
        return "mni152"
    what = " and ".join(missing)
    if source == "mni152":
        raise RuntimeError(f"anatomy source 'mni152' needs {what}")
    msg = f"anatomy: {what} not found; falling back to analytic Shepp-Logan phantoms"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
    return "phantom"


def load_brain_slices(n_slices: int, image_size: int, *, source: str = "auto", seed: Seed = 0,
                      contrast: str = "t1", z_range: tuple[float, float] = (0.25, 0.85),
                      augment: bool = True, fov_mm: float = FOV_MM) -> BrainSlices:
    """``n_slices`` contiguous axial slices through a brain, resampled to ``image_size``.

    Parameters
    ----------
    n_slices : int
        Number of slices ``n`` (a slab, inferior to superior).
    image_size : int
        Output size ``N`` (square images).
    source : {"auto", "mni152", "phantom"}
        Where the anatomy comes from (see the module docstring).
    seed : int or sequence of int, optional
        Seeds the slab position and, with ``augment``, the flip, rotation, scale and shift.
    contrast : {"t1", "t2", "flair", "pd"}
        Tissue contrast.
    z_range : (float, float)
        Part of the brain's inferior-superior extent (fractions in ``[0, 1]``) the slab is
        drawn from: ``(0, 0.35)`` is the posterior fossa, ``(0.6, 1)`` the vertex.
    augment : bool
        Random left-right flip, rotation (+-8 deg), scale (+-8 %) and shift (+-4 mm).
    fov_mm : float
        Field of view of the output images (the brain spans ~170 mm anterior-posterior).

    Returns
    -------
    BrainSlices
        ``images`` float32 ``(n, N, N)`` in ``[0, 1]`` and the ``source`` used.
    """
    if int(n_slices) < 1 or int(image_size) < 2:
        raise ValueError(f"arguments 'n_slices' (>= 1) and 'image_size' (>= 2) out of range; "
                         f"got {n_slices}, {image_size}")
    if contrast not in CONTRASTS:
        raise ValueError(f"argument 'contrast' must be one of {tuple(CONTRASTS)}; "
                         f"got {contrast!r}")
    lo, hi = (float(v) for v in z_range)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"argument 'z_range' must satisfy 0 <= lo < hi <= 1; got {z_range}")
    used = resolve_anatomy_source(source)
    rng = np.random.default_rng(seed)
    if used == "mni152":
        images = _mni152_slices(int(n_slices), int(image_size), rng, contrast, (lo, hi),
                                augment, float(fov_mm))
    else:
        images = _phantom_slices(int(n_slices), int(image_size), rng, contrast, (lo, hi),
                                 augment)
    return BrainSlices(np.clip(images, 0.0, 1.0).astype(np.float32), used)


# -- MNI152 ----------------------------------------------------------------------------------
class _Template(NamedTuple):
    t1: np.ndarray        # (X, Y, Z) float32 in [0, 1], RAS voxel axes
    mask: np.ndarray      # (X, Y, Z) float32 brain mask (ventricles included)
    inv_affine: np.ndarray  # world (mm) -> voxel
    centre_mm: np.ndarray   # brain centroid (x, y, z) in mm
    z_extent: tuple[float, float]  # brain's inferior / superior world z (mm)


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """Read the template once per process (read-only arrays; ~0.6 s)."""
    import nibabel  # only needed for this source

    path = mni152_template_path()
    assert path is not None  # resolve_anatomy_source checked it
    img = nibabel.as_closest_canonical(nibabel.load(str(path)))
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    t1 /= max(float(t1.max()), 1e-12)
    mask = ndimage.binary_fill_holes(t1 > 0.02)
    affine = np.asarray(img.affine, dtype=np.float64)
    idx = np.argwhere(mask)

    def world(ijk: np.ndarray) -> np.ndarray:
        return affine[:3, :3] @ ijk + affine[:3, 3]

    centre = world(idx.mean(axis=0))
    z_ends = sorted(world(np.array([0.0, 0.0, k]))[2]
                    for k in (idx[:, 2].min(), idx[:, 2].max()))
    mask_f = mask.astype(np.float32)
    t1.flags.writeable = mask_f.flags.writeable = False
    return _Template(t1, mask_f, np.linalg.inv(affine), centre, (z_ends[0], z_ends[1]))


def _draw_pose(rng: np.random.Generator, augment: bool) -> tuple[bool, float, float, np.ndarray]:
    if not augment:
        return False, 0.0, 1.0, np.zeros(2)
    flip = bool(rng.random() < 0.5)
    angle = float(np.deg2rad(rng.uniform(-8.0, 8.0)))
    scale = float(rng.uniform(0.92, 1.08))
    shift = rng.uniform(-4.0, 4.0, size=2)
    return flip, angle, scale, shift


def _slab_positions(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """``n`` evenly spaced positions (fractions) of a slab drawn inside ``[lo, hi]``."""
    width = hi - lo
    thick = width * rng.uniform(0.6, 1.0) if n > 1 else 0.0
    start = rng.uniform(lo, hi - thick) if hi - thick > lo else lo
    return np.linspace(start, start + thick, n) if n > 1 else np.array([start + thick / 2])


def _mni152_slices(n: int, size: int, rng: np.random.Generator, contrast: str,
                   z_range: tuple[float, float], augment: bool, fov_mm: float) -> np.ndarray:
    tpl = _template()
    frac = _slab_positions(rng, n, *z_range)
    flip, angle, scale, shift = _draw_pose(rng, augment)
    z_mm = tpl.z_extent[0] + frac * (tpl.z_extent[1] - tpl.z_extent[0])

    # Output pixel (r, c) -> in-plane offsets (u right-on-screen, v down) in mm. Radiological
    # display: anterior at the top, the patient's right on the left of the image.
    pix = fov_mm / size / scale
    grid = (np.arange(size) - (size - 1) / 2) * pix
    v, u = np.meshgrid(grid, grid, indexing="ij")
    if flip:
        u = -u
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * u - sin * v, sin * u + cos * v
    x = tpl.centre_mm[0] + shift[0] - u
    y = tpl.centre_mm[1] + shift[1] - v

    # Anti-alias in-plane before sampling (Gaussian of skimage's width, in voxels), on the
    # few template slices the slab needs only.
    k_float = (tpl.inv_affine[2, 2] * z_mm + tpl.inv_affine[2, 3])
    k0 = np.clip(np.floor(k_float).astype(int), 0, tpl.t1.shape[2] - 2)
    needed = np.unique(np.concatenate([k0, k0 + 1]))
    sigma = max(0.0, (pix / abs(1.0 / tpl.inv_affine[0, 0]) - 1) / 2)
    stack = np.stack([tpl.t1[:, :, needed], tpl.mask[:, :, needed]])
    if sigma > 0:
        stack = ndimage.gaussian_filter(stack, sigma=(0, sigma, sigma, 0))
    k_local = np.searchsorted(needed, k0) + np.clip(k_float - k0, 0.0, 1.0)

    # the canonical (RAS) template is axis-aligned: the voxel z depends on world z only
    inv, zz = tpl.inv_affine, z_mm[:, None, None]
    ii = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2] * zz + inv[0, 3]
    jj = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2] * zz + inv[1, 3]
    coords = np.stack([ii, jj, np.broadcast_to(k_local[:, None, None], ii.shape)])
    t1 = ndimage.map_coordinates(stack[0], coords, order=1, mode="constant", cval=0.0)
    mask = ndimage.map_coordinates(stack[1], coords, order=1, mode="constant", cval=0.0)
    return _apply_contrast(t1, mask, contrast)


def _apply_contrast(t1: np.ndarray, mask: np.ndarray, contrast: str) -> np.ndarray:
    table = CONTRASTS[contrast]
    if table is None:
        return t1
    return mask * np.interp(t1, _T1_XP, table)


# -- analytic fallback -----------------------------------------------------------------------
def _phantom_slices(n: int, size: int, rng: np.random.Generator, contrast: str,
                    z_range: tuple[float, float], augment: bool) -> np.ndarray:
    """Shepp-Logan slices whose inner ellipses shrink away from the slab centre (a crude
    3D head) with per-volume pose and per-slice intensity jitter."""
    import torch

    from fedrecon.operators import MODIFIED_SHEPP_LOGAN, shepp_logan

    base = np.array(MODIFIED_SHEPP_LOGAN, dtype=np.float64)
    flip, angle, scale, shift = _draw_pose(rng, augment)
    frac = _slab_positions(rng, n, *z_range)
    out = np.empty((n, size, size), dtype=np.float64)
    for s, f in enumerate(frac):
        table = base.copy()
        t = 2 * f - 1  # -1 (inferior) .. 1 (superior)
        table[:, 1:3] *= scale
        table[2:, 1:3] *= np.sqrt(max(1 - 0.6 * t * t, 0.05))
        table[2:, 0] *= rng.uniform(0.8, 1.2, size=len(table) - 2)
        table[:, 3:5] += shift / 110.0
        if flip:
            table[:, 3] *= -1
            table[:, 5] *= -1
        c, si = np.cos(angle), np.sin(angle)
        x0, y0 = table[:, 3].copy(), table[:, 4].copy()
        table[:, 3], table[:, 4] = c * x0 - si * y0, si * x0 + c * y0
        table[:, 5] += np.rad2deg(angle)
        img = shepp_logan(size, ellipses=table.tolist(), oversample=2, dtype=torch.float64)
        out[s] = img.numpy()
    head = (out > 1e-3).astype(np.float64)
    return _apply_contrast(np.clip(out, 0.0, 1.0), head, contrast)
