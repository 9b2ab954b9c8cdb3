"""Metrics against scikit-image's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrecon.metrics import nmse, psnr, ssim

skm = pytest.importorskip("skimage.metrics")


def test_ssim_psnr_nmse_match_skimage() -> None:
    rng = np.random.default_rng(0)
    ref = rng.random((3, 40, 36))
    x = ref + 0.1 * rng.standard_normal(ref.shape)
    dr = ref.max()
    ours_ssim = ssim(torch.tensor(x), torch.tensor(ref), dr)
    ours_psnr = psnr(torch.tensor(x), torch.tensor(ref), dr)
    for i in range(3):
        assert abs(float(ours_ssim[i]) - skm.structural_similarity(x[i], ref[i], data_range=dr)) < 1e-10
        assert abs(float(ours_psnr[i]) - skm.peak_signal_noise_ratio(ref[i], x[i], data_range=dr)) < 1e-9
    expected_nmse = np.sum((x - ref) ** 2, axis=(1, 2)) / np.sum(ref**2, axis=(1, 2))
    assert np.allclose(nmse(torch.tensor(x), torch.tensor(ref)).numpy(), expected_nmse)


def test_ssim_is_differentiable_and_one_for_identical_images() -> None:
    x = torch.rand(2, 16, 16, dtype=torch.float64, requires_grad=True)
    s = ssim(x, x.detach(), 1.0)
    assert torch.allclose(s, torch.ones(2, dtype=torch.float64))
    (1 - ssim(x * 0.9, x.detach(), 1.0)).sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(torch.zeros(4, 4), torch.zeros(4, 4))
