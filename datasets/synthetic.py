"""Simulated raw MRI in the fastMRI file layout, from real anatomy (see :mod:`.anatomy`).

Per slice: magnitude image -> smooth random phase -> birdcage coil sensitivities ->
centred orthonormal FFT (:func:`fedrecon.operators.fft2c`) -> complex Gaussian noise. Each
volume is written with :func:`fedrecon.datasets.fastmri_write.write_fastmri_volume`, so the
files are read back by :class:`fedrecon.datasets.fastmri.FastMRISliceDataset` like real data.

Noise convention: ``noise_std`` is the standard deviation of the *complex* noise of one
k-space sample (``E|n|^2 = noise_std^2``; real and imaginary parts have ``noise_std / sqrt 2``),
in the units of the images (whose maximum is about one). The FFT is orthonormal, so each coil
image carries the same noise level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedrecon.operators import birdcage_maps, fft2c, rss

from .anatomy import CONTRASTS, FOV_MM, load_brain_slices

__all__ = [
    "ACQUISITION_CONTRAST",
    "SLICE_THICKNESS_MM",
    "make_synthetic_fastmri",
    "simulate_kspace",
    "smooth_phase",
]

SLICE_THICKNESS_MM = 5.0  # written to the header (fastMRI brain: 5 mm axial slices)

# fastMRI brain acquisition labels -> the contrast simulated for them
ACQUISITION_CONTRAST: dict[str, str] = {
    "AXT1": "t1", "AXT1PRE": "t1", "AXT1POST": "t1",
    "AXT2": "t2", "AXFLAIR": "flair",
    "CORPD_FBK": "pd", "CORPDFS_FBK": "pd",
}


def smooth_phase(shape: Sequence[int], rng: np.random.Generator, *, n_freq: int = 3,
                 std: float = 1.0) -> np.ndarray:
    """Smooth random phase maps ``(..., H, W)`` (radians), band-limited to ``n_freq``
    cycles per field of view, with a random offset; ``std`` is their spatial spread."""
    *lead, h, w = (int(s) for s in shape)
    ky = np.fft.fftfreq(h, 1 / h)[:, None]
    kx = np.fft.fftfreq(w, 1 / w)[None, :]
    keep = (np.abs(ky) <= n_freq) & (np.abs(kx) <= n_freq)
    coef = rng.standard_normal((*lead, h, w, 2)) @ np.array([1.0, 1j])
    coef *= keep / (1.0 + ky**2 + kx**2)
    field = np.fft.ifft2(coef).real
    field -= field.mean(axis=(-2, -1), keepdims=True)
    field /= field.std(axis=(-2, -1), keepdims=True) + 1e-12
    offset = rng.uniform(-math.pi, math.pi, size=(*lead, 1, 1))
    return std * field + offset


def simulate_kspace(images: np.ndarray, coil_maps: torch.Tensor | None, phase: np.ndarray,
                    noise_std: float, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Noisy k-space and the clean RSS target of magnitude ``images`` ``(S, H, W)``.

    Parameters
    ----------
    images : np.ndarray
        ``(S, H, W)`` real magnitudes.
    coil_maps : Tensor or None
        ``(C, H, W)`` complex sensitivities; ``None`` for single-coil.
    phase : np.ndarray
        ``(S, H, W)`` phase maps (radians).
    noise_std : float
        Complex noise standard deviation per k-space sample (see the module docstring).
    rng : np.random.Generator
        Draws the noise.

    Returns
    -------
    (np.ndarray, np.ndarray)
        complex64 k-space ``(S, C, H, W)`` (``(S, H, W)`` single-coil) and the float32
        root-sum-of-squares of the noise-free coil images ``(S, H, W)`` (the magnitude
        single-coil).
    """
    x = torch.from_numpy((images * np.exp(1j * phase)).astype(np.complex64))
    coil_images = x if coil_maps is None else coil_maps.unsqueeze(0) * x.unsqueeze(1)
    kspace = fft2c(coil_images).numpy()
    if noise_std > 0:
        noise = rng.standard_normal((2, *kspace.shape), dtype=np.float32)
        kspace = kspace + (noise_std / math.sqrt(2)) * (noise[0] + 1j * noise[1])
    target = coil_images.abs() if coil_maps is None else rss(coil_images, dim=1)
    return kspace.astype(np.complex64), target.numpy().astype(np.float32)


def make_synthetic_fastmri(out_dir: str | Path, n_volumes: int = 4, n_coils: int = 8,
                           image_size: int = 128, n_slices: int = 8, seed: int = 0, *,
                           noise_std: float = 0.002, acquisition: str = "AXT1",
                           anatomy: str = "auto", contrast: str | None = None,
                           z_range: tuple[float, float] = (0.25, 0.85), augment: bool = True,
                           coil_radius: float = 1.5, coil_shading: bool = False,
                           phase_std: float = 1.0, challenge: str = "multicoil",
                           name_prefix: str | None = None, overwrite: bool = False
                           ) -> list[Path]:
    """Write ``n_volumes`` simulated fastMRI-layout HDF5 volumes and return their paths.

    Parameters
    ----------
    out_dir : str or Path
        Folder for the files (created).
    n_volumes, n_coils, image_size, n_slices : int
        Volumes, coils ``C`` (ignored single-coil), image size ``N`` (the k-space matrix and
        the recon size) and slices ``S`` per volume.
    seed : int
        Same seed, same files (bitwise k-space); volume ``i`` uses ``SeedSequence(seed)``'s
        ``i``-th child, so the first volumes do not change with ``n_volumes``.
    noise_std : float
        Complex k-space noise standard deviation (module docstring).
    acquisition : str
        fastMRI acquisition label written to the file (``"AXT1"``, ``"AXT2"``, ``"AXFLAIR"``,
        ``"CORPD_FBK"``, ...); it picks the contrast unless ``contrast`` is given.
    anatomy : {"auto", "mni152", "phantom"}
        Anatomy source (:func:`fedrecon.datasets.anatomy.load_brain_slices`).
    contrast : {"t1", "t2", "flair", "pd"}, optional
        Tissue contrast; by default from ``acquisition`` (``"t1"`` when unknown).
    z_range, augment
        Slab range and pose augmentation of the anatomy (volumes differ by slab, flip,
        rotation, scale and shift).
    coil_radius : float
        Radius of the birdcage coil circle (half image widths); each volume draws a random
        rotation of the array.
    coil_shading : bool
        ``False``: maps normalised to ``sum_c |S_c|^2 = 1`` (the RSS target is the anatomy
        itself). ``True``: raw loop-coil profiles, brighter near the coils.
    phase_std : float
        Spatial spread (radians) of the smooth random phase.
    challenge : {"multicoil", "singlecoil"}
        ``"singlecoil"`` writes ``(S, N, N)`` k-space and ``reconstruction_esc`` (and
        ``reconstruction_rss``) equal to the magnitude.
    name_prefix : str, optional
        File names are ``f"{name_prefix}{i:03d}.h5"``; default ``f"synth_{acquisition}_s{seed}_"``.
    overwrite : bool
        Replace existing files (otherwise the writer refuses).

    Returns
    -------
    list of Path
        The written files, in volume order.
    """
    from .fastmri_write import write_fastmri_volume  # the fastMRI work's writer

    if challenge not in ("multicoil", "singlecoil"):
        raise ValueError(f"argument 'challenge' must be 'multicoil' or 'singlecoil'; "
                         f"got {challenge!r}")
    if int(n_volumes) < 1 or int(n_slices) < 1 or (challenge == "multicoil" and int(n_coils) < 1):
        raise ValueError(f"arguments 'n_volumes', 'n_slices' and 'n_coils' must be >= 1; got "
                         f"{n_volumes}, {n_slices}, {n_coils}")
    if noise_std < 0:
        raise ValueError(f"argument 'noise_std' must be >= 0; got {noise_std}")
    contrast = contrast or ACQUISITION_CONTRAST.get(acquisition, "t1")
    if contrast not in CONTRASTS:
        raise ValueError(f"argument 'contrast' must be one of {tuple(CONTRASTS)}; "
                         f"got {contrast!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = name_prefix if name_prefix is not None else f"synth_{acquisition}_s{seed}_"
    size = int(image_size)

    paths = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(int(n_volumes))):
        anatomy_seed, coil_seed, noise_seed = child.spawn(3)
        slices = load_brain_slices(int(n_slices), size, source=anatomy, seed=anatomy_seed,
                                   contrast=contrast, z_range=z_range, augment=augment)
        rng = np.random.default_rng(coil_seed)
        maps = None
        if challenge == "multicoil":
            maps = birdcage_maps(int(n_coils), size, radius=coil_radius,
                                 rotation=float(rng.uniform(0, 2 * math.pi)),
                                 normalize=not coil_shading)
        phase = smooth_phase(slices.images.shape, rng, std=phase_std)
        kspace, target = simulate_kspace(slices.images, maps, phase, noise_std,
                                         np.random.default_rng(noise_seed))
        recon = {"reconstruction_rss": target}
        if challenge == "singlecoil":
            recon["reconstruction_esc"] = target
        attrs = {"synthetic": True, "generator": "fedrecon.datasets.make_synthetic_fastmri",
                 "anatomy": slices.source, "contrast": contrast, "seed": int(seed),
                 "volume_index": i, "noise_std": float(noise_std),
                 "n_coils": 1 if maps is None else int(n_coils),
                 "coil_radius": float(coil_radius)}
        paths.append(write_fastmri_volume(
            out_dir / f"{prefix}{i:03d}.h5", kspace, **recon, acquisition=acquisition,
            recon_size=(size, size), max_value=float(target.max()),
            patient_id=f"{prefix}{i:03d}", overwrite=overwrite, attrs=attrs,
            voxel_size_mm=(FOV_MM / size, FOV_MM / size, SLICE_THICKNESS_MM)))
    return [Path(p) for p in paths]
