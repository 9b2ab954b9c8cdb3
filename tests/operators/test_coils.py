"""Coil maps: simulated birdcage sensitivities and ESPIRiT estimation."""

from __future__ import annotations

import math

import pytest
import torch

from fedrecon.operators import MultiCoilMRI, birdcage_maps, espirit_maps, fft2c, rss


def test_birdcage_shape_normalization_and_determinism(device):
    maps = birdcage_maps(8, (48, 40), device=device)
    assert maps.shape == (8, 48, 40) and maps.dtype == torch.complex64
    assert maps.device.type == torch.device(device).type
    torch.testing.assert_close(rss(maps), torch.ones(48, 40, device=device))
    torch.testing.assert_close(maps, birdcage_maps(8, (48, 40), device=device))
    raw = birdcage_maps(8, 32, normalize=False, dtype=torch.complex128)
    assert abs(rss(raw)[16, 16].item() - 1) < 1e-12
    assert birdcage_maps(3, 16, dtype=torch.complex128).dtype == torch.complex128


def test_birdcage_coils_are_distinct_and_smooth():
    maps = birdcage_maps(8, 64, dtype=torch.complex128)
    flat = maps.reshape(8, -1)
    flat = flat / flat.norm(dim=1, keepdim=True)
    corr = (flat.conj() @ flat.T).abs()
    assert (corr - torch.eye(8)).max() < 0.99
    # each coil is brightest on its own side: coil 0 sits on the +x (column) axis
    mag = maps[0].abs()
    assert mag[32, 63] > mag[32, 0]
    # smooth (magnitude and phase): almost all energy at the lowest spatial frequencies
    energy = fft2c(maps).abs().square()
    assert (energy[:, 24:40, 24:40].sum((-2, -1)) / energy.sum((-2, -1))).min() > 0.97
    rotated = birdcage_maps(8, 64, rotation=math.pi / 8, dtype=torch.complex128)
    assert not torch.allclose(rotated, maps)


def test_birdcage_validation():
    with pytest.raises(ValueError, match="n_coils"):
        birdcage_maps(0, 16)
    with pytest.raises(ValueError, match="shape"):
        birdcage_maps(4, (16, 16, 16))
    with pytest.raises(ValueError, match="dtype"):
        birdcage_maps(4, 16, dtype=torch.float32)


def _phantom(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An ellipse with a smooth magnitude and phase, and a mask of its interior."""
    y = (torch.arange(h, dtype=torch.float64) - h // 2).view(h, 1) / (h / 2)
    x = (torch.arange(w, dtype=torch.float64) - w // 2).view(1, w) / (w / 2)
    r2 = (x / 0.75) ** 2 + (y / 0.6) ** 2
    inside = r2 < 1
    magnitude = inside * (1 + 0.3 * torch.cos(2 * x) * torch.sin(3 * y + 0.5))
    image = torch.polar(magnitude, 0.5 * x + 0.3 * y ** 2)
    return image, r2 < 0.8


@pytest.fixture(scope="module")
def espirit_case():
    """One ESPIRiT run (it is slow) on a batch: [ACS-only k-space, fully sampled k-space]."""
    h, w = 48, 48
    image, interior = _phantom(h, w)
    true = birdcage_maps(6, (h, w), dtype=torch.complex64, rotation=0.3)
    kspace = fft2c(true * image.to(torch.complex64))
    acs = torch.zeros_like(kspace)
    acs[:, h // 2 - 12 : h // 2 + 12, w // 2 - 12 : w // 2 + 12] = 1
    est = espirit_maps(torch.stack([kspace * acs, kspace]), calib_width=20)
    return image, interior, true, kspace, est


def _map_correlation(est: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``|<S_est, S_true>| / (|S_est| |S_true|)`` per pixel: one when equal up to a phase."""
    return (est.conj() * true).sum(0).abs() / (rss(est) * rss(true)).clamp_min(1e-12)


def test_espirit_recovers_birdcage_maps(espirit_case):
    image, interior, true, kspace, est = espirit_case
    assert est.shape == (2, *true.shape) and est.dtype == kspace.dtype
    assert _map_correlation(est[1], true)[interior].min() > 0.95
    # SENSE adjoint of the fully sampled data with the estimated maps: the image magnitude
    recon = MultiCoilMRI(est[1], torch.ones(kspace.shape[-2:])).A_adjoint(kspace)
    magnitude = image.abs().to(torch.float32)
    err = (recon.abs() - magnitude)[interior].norm() / magnitude[interior].norm()
    assert err < 0.05


def test_espirit_uses_only_the_calibration_region(espirit_case):
    image, interior, true, kspace, est = espirit_case
    torch.testing.assert_close(est[0], est[1], rtol=1e-3, atol=1e-3)
    assert _map_correlation(est[0], true)[interior].min() > 0.95


def test_espirit_validation():
    kspace = torch.zeros(4, 16, 16, dtype=torch.complex64)
    with pytest.raises(ValueError, match="'kspace'"):
        espirit_maps(kspace[0])
    with pytest.raises(ValueError, match="'kspace'"):
        espirit_maps(kspace.real)
