"""Coil sensitivity maps: simulated birdcage maps and ESPIRiT estimation (via sigpy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._checks import as_image_size, check_complex, check_tensor, format_shape

__all__ = ["birdcage_maps", "espirit_maps"]


def birdcage_maps(n_coils: int, shape: int | Sequence[int], radius: float = 1.5,
                  rotation: float = 0.0, normalize: bool = True,
                  dtype: torch.dtype = torch.complex64,
                  device: str | torch.device | None = None) -> Tensor:
    """Simulated sensitivities of ``n_coils`` loop coils evenly spaced on a circle.

    Coordinates are centred at pixel ``(H // 2, W // 2)`` (the FFT centre) and scaled so the
    longer side of the image spans ``[-1, 1]``. Coil ``c`` sits at angle
    ``2 pi c / n_coils + rotation`` on a circle of ``radius`` (> sqrt(2) keeps every coil
    outside the image). Its raw sensitivity is ``exp(i theta_c) conj(d) / |d|^2`` with
    ``d = (x - x_c) + i (y - y_c)``: magnitude ``1 / |d|`` (falls smoothly with distance)
    and a smooth phase ``theta_c - arg d``.

    Parameters
    ----------
    n_coils : int
        Number of coils ``C``.
    shape : int or (int, int)
        Image size ``(H, W)``.
    radius : float
        Radius of the coil circle in units of half the longer image side.
    rotation : float
        Angle (radians) of the first coil, measured from the x (column) axis.
    normalize : bool
        Scale the maps pixel-wise so that ``sum_c |S_c|^2 = 1`` everywhere (RSS of one, the
        normalization of ESPIRiT maps; a fully sampled SENSE adjoint is then the identity).
        With ``False`` the raw maps are divided by the RSS at the image centre.
    dtype : torch.dtype
        Complex dtype of the result.
    device : str or torch.device, optional
        Device of the result.

    Returns
    -------
    Tensor
        ``(C, H, W)`` complex coil maps.
    """
    if n_coils < 1:
        raise ValueError(f"argument 'n_coils' must be a positive int; got {n_coils}")
    if not radius > 0:
        raise ValueError(f"argument 'radius' must be positive; got {radius}")
    if not dtype.is_complex:
        raise ValueError(f"argument 'dtype' must be complex; got {dtype}")
    h, w = as_image_size("shape", shape)
    scale = max(h, w) / 2
    y = (torch.arange(h, dtype=torch.float64) - h // 2).view(1, h, 1) / scale
    x = (torch.arange(w, dtype=torch.float64) - w // 2).view(1, 1, w) / scale
    theta = torch.arange(n_coils, dtype=torch.float64) * (2 * math.pi / n_coils) + rotation
    theta = theta.view(n_coils, 1, 1)
    d = torch.complex(x - radius * torch.cos(theta), y - radius * torch.sin(theta))
    maps = torch.polar(torch.ones_like(theta), theta) * d.conj() / d.abs().square()
    norm = torch.linalg.vector_norm(maps, dim=0, keepdim=True)
    maps = maps / norm if normalize else maps / norm[..., h // 2, w // 2]
    return maps.to(device=device, dtype=dtype)


def espirit_maps(kspace: Tensor, calib_width: int = 24, thresh: float = 0.02,
                 kernel_width: int = 6, crop: float = 0.95, max_iter: int = 100) -> Tensor:
    """Estimate coil maps with ESPIRiT (``sigpy.mri.app.EspiritCalib``), on the CPU.

    ``kspace`` follows the centred convention of :func:`fedrecon.operators.fft2c` (the same
    as sigpy's), so the maps plug straight into :class:`~fedrecon.operators.MultiCoilMRI`.
    Only the central ``calib_width`` square is used; undersampled k-space with a fully
    sampled centre (ACS) is fine.

    Parameters
    ----------
    kspace : Tensor
        ``(C, H, W)`` or ``(B, C, H, W)`` complex k-space (a batch is processed one sample
        at a time).
    calib_width, thresh, kernel_width, crop, max_iter
        ESPIRiT's calibration width, singular-value threshold, kernel width, eigenvalue crop
        (pixels whose eigenvalue is below ``crop`` get zero maps) and power iterations.

    Returns
    -------
    Tensor
        Maps shaped like ``kspace``, with its dtype and device; ``sum_c |S_c|^2`` is one
        inside the support and zero where cropped.
    """
    check_tensor("kspace", kspace)
    if kspace.ndim not in (3, 4):
        raise ValueError(f"argument 'kspace' must have shape (C, H, W) or (B, C, H, W); "
                         f"got {format_shape(tuple(kspace.shape))}")
    check_complex("kspace", kspace, "espirit_maps")
    from sigpy.mri.app import EspiritCalib  # heavy (numba); imported only when needed

    ksp = kspace.detach().cpu().numpy()
    batch = ksp.reshape(-1, *ksp.shape[-3:])
    out = np.stack([
        EspiritCalib(k, calib_width=calib_width, thresh=thresh, kernel_width=kernel_width,
                     crop=crop, max_iter=max_iter, show_pbar=False).run()
        for k in batch
    ]).reshape(ksp.shape)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=kspace.device,
                                                          dtype=kspace.dtype)
