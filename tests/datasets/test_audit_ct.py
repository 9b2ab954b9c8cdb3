"""Audit: CT volume files of the wrong dtype, bad FBP filters, and the simulated
acquisition's noise against the analytic Poisson statistics."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from fedrecon.datasets import (
    MU_WATER_PER_MM,
    CTAcquisition,
    CTFileError,
    CTSliceDataset,
    write_ct_volume,
)


@pytest.mark.parametrize("image", [np.ones((1, 8, 8), np.complex64),
                                   np.full((1, 8, 8), b"a")])
def test_non_real_image_is_a_file_error_naming_file_and_key(tmp_path, image):
    path = tmp_path / "vol.h5"
    with h5py.File(path, "w") as f:
        f["image"] = image
        f.attrs["units"] = "HU"
        f.attrs["pixel_spacing"] = [1.0, 1.0]
    acq = CTAcquisition(n_views=8, image_size=8)
    with pytest.raises(CTFileError, match="'image'") as info:
        CTSliceDataset(path, acq)
    assert str(path) in str(info.value)


def test_integer_hu_image_is_accepted(tmp_path):
    path = tmp_path / "vol.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((1, 8, 8), np.int16)  # water, as DICOM stores it
        f.attrs["units"] = "HU"
        f.attrs["pixel_spacing"] = [1.0, 1.0]
    sample = CTSliceDataset(path, CTAcquisition(n_views=8, image_size=8))[0]
    torch.testing.assert_close(sample.target, torch.full((8, 8), MU_WATER_PER_MM))


def test_unknown_fbp_filter_fails_at_construction(tmp_path):
    path = write_ct_volume(tmp_path / "vol.h5", np.zeros((1, 8, 8)), units="HU",
                           pixel_spacing=1.0)
    with pytest.raises(ValueError, match="fbp_filter"):
        CTSliceDataset(path, CTAcquisition(n_views=8, image_size=8), return_fbp=True,
                       fbp_filter="ramp-lak")


def test_low_dose_noise_matches_poisson_statistics(tmp_path):
    """-log(N / I0) with N ~ Poisson(I0 exp(-p)): mean p + 1 / (2 I0 e^-p) to first order,
    variance 1 / (I0 e^-p) (delta method)."""
    path = write_ct_volume(tmp_path / "water.h5", np.zeros((2, 32, 32)), units="HU",
                           pixel_spacing=2.0)
    kw = {"n_views": 64, "image_size": 32, "pixel_spacing": 2.0}
    clean = CTSliceDataset(path, CTAcquisition(**kw))[0].sinogram.double()
    noisy = CTSliceDataset(path, CTAcquisition(photons=2e3, **kw), seed=3)
    inside = clean > 0.5  # rays through the water disk
    expected = 2e3 * torch.exp(-clean[inside])
    z = torch.cat([(noisy[s].sinogram.double() - clean)[inside] * expected.sqrt()
                   for s in range(2)])
    assert z.numel() > 2000
    assert z.var().item() == pytest.approx(1.0, abs=0.08)
    bias = torch.cat([1 / (2 * expected.sqrt())] * 2)  # in units of the noise std
    assert (z - bias).mean().item() == pytest.approx(0.0, abs=4 / z.numel() ** 0.5)
