"""Low-dose CT measurement simulation: transmission noise and the log transform.

A sinogram ``p`` of line integrals (physical units: attenuation per length times length,
e.g. 1/mm with ``pixel_spacing`` in mm) becomes detected counts
``N ~ Poisson(I0 * exp(-p)) + Normal(0, sigma_e^2)`` (photon statistics plus electronic
noise); :func:`log_transform` turns counts back into line integrals ``-log(N / I0)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_positive, check_real

__all__ = ["simulate_transmission", "log_transform", "simulate_low_dose"]


def _generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def simulate_transmission(sino: Tensor, photons: float, electronic_noise: float = 0.0, *,
                          seed: int | torch.Generator | None = None) -> Tensor:
    """Noisy detector counts ``(..., n_angles, n_det)`` for blank-scan intensity ``photons``.

    Parameters
    ----------
    sino
        Clean line integrals (real, >= 0 for physical data).
    photons
        Incident photons per detector bin, ``I0`` (e.g. 1e5 normal dose, 1e4 low dose).
    electronic_noise
        Standard deviation of additive Gaussian read-out noise, in counts.
    seed
        An int or a ``torch.Generator``; the same seed gives the same noise.
    """
    check_real("sino", sino, owner="simulate_transmission")
    photons = check_positive("photons", photons)
    electronic_noise = float(electronic_noise)
    if not (math.isfinite(electronic_noise) and electronic_noise >= 0):  # NaN: no noise at all
        raise ValueError(f"argument 'electronic_noise' must be finite and >= 0; "
                         f"got {electronic_noise}")
    gen = _generator(seed, sino.device)
    rate = photons * torch.exp(-sino.detach().to(torch.float64))
    counts = torch.poisson(rate, generator=gen)
    if electronic_noise > 0:
        counts = counts + electronic_noise * torch.randn(counts.shape, generator=gen,
                                                         dtype=counts.dtype, device=counts.device)
    return counts.to(sino.dtype)


def log_transform(counts: Tensor, photons: float, min_count: float = 0.5) -> Tensor:
    """Line integrals ``-log(max(N, min_count) / I0)`` from detected counts."""
    photons = check_positive("photons", photons)
    min_count = check_positive("min_count", min_count)
    return -torch.log(counts.clamp_min(min_count) / photons)


def simulate_low_dose(sino: Tensor, photons: float, electronic_noise: float = 0.0, *,
                      seed: int | torch.Generator | None = None, min_count: float = 0.5) -> Tensor:
    """Noisy line integrals: :func:`simulate_transmission` followed by :func:`log_transform`."""
    counts = simulate_transmission(sino, photons, electronic_noise, seed=seed)
    return log_transform(counts, photons, min_count)
