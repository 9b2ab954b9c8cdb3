"""Audit: file modes of the atomic writers and the header of undersampled test files."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as etree

import h5py
import numpy as np
import pytest
from fedrecon.datasets import FastMRISliceDataset, write_ct_volume, write_fastmri_volume

NS = {"m": "http://www.ismrm.org/ISMRMRD"}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield 0o644  # what open(path, "w") gives under this umask
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_fastmri_writer_respects_umask(tmp_path, umask_022):
    k = np.ones((1, 2, 8, 8), np.complex64)
    path = write_fastmri_volume(tmp_path / "a.h5", k, recon_size=(4, 4))
    assert _mode(path) == umask_022  # not mkstemp's 0600: colleagues must read the data
    path = write_fastmri_volume(tmp_path / "a.h5", 2 * k, recon_size=(4, 4), overwrite=True)
    assert _mode(path) == umask_022
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]


def test_ct_writer_respects_umask(tmp_path, umask_022):
    path = write_ct_volume(tmp_path / "c.h5", np.zeros((1, 4, 4)), units="HU",
                           pixel_spacing=1.0)
    assert _mode(path) == umask_022
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_test_file_default_acquired_columns_cover_width(tmp_path):
    """A test file's k-space is undersampled: its first sampled line is not where the
    acquisition began, so without ``acquired_columns`` the header must not claim padding."""
    width = 25
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((2, 3, 16, width))
         + 1j * rng.standard_normal((2, 3, 16, width))).astype(np.complex64)
    mask = np.zeros(width, bool)
    mask[10:16] = True  # ACS around 25 // 2 = 12
    mask[[4, 20]] = True  # first and last sampled lines well inside the width
    path = write_fastmri_volume(tmp_path / "file1.h5", k * mask, mask=mask, recon_size=(8, 8))
    with h5py.File(path, "r") as hf:
        root = etree.fromstring(hf["ismrmrd_header"][()])
    lims = root.find("./m:encoding/m:encodingLimits/m:kspace_encoding_step_1", NS)
    center = int(lims.find("m:center", NS).text)
    maximum = int(lims.find("m:maximum", NS).text)
    # fastMRI: padding_left = W // 2 - center, padding_right = padding_left + maximum + 1
    assert (width // 2 - center, width // 2 - center + maximum + 1) == (0, width)
    sample = FastMRISliceDataset(path)[0]
    assert sample.protocol[0].item() == pytest.approx(width / 8)  # 25 columns, 8 sampled
    np.testing.assert_array_equal(sample.mask.reshape(-1).numpy(), mask.astype(np.float32))


@pytest.mark.parametrize("multicoil", [True, False])
def test_round_trip_data_and_metadata(tmp_path, multicoil):
    """Write a zero-padded odd-width train volume and read it back: arrays bit for bit,
    attributes and the acquired columns as written."""
    rng = np.random.default_rng(1)
    shape = (2, 3, 20, 27) if multicoil else (2, 20, 27)
    k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    k[..., :3] = 0
    k[..., 25:] = 0
    target = rng.random((2, 10, 10)).astype(np.float32)
    key = "reconstruction_rss" if multicoil else "reconstruction_esc"
    path = write_fastmri_volume(tmp_path / "file7.h5", k, **{key: target}, recon_size=(10, 10),
                                acquisition="AXT2", patient_id="pid-7",
                                attrs={"site": "b"})
    with h5py.File(path, "r") as hf:
        np.testing.assert_array_equal(hf["kspace"][()], k)
        np.testing.assert_array_equal(hf[key][()], target)
        assert hf.attrs["max"] == pytest.approx(float(target.max()))
        assert hf.attrs["norm"] == pytest.approx(float(np.sqrt((target.astype(np.float64) ** 2)
                                                               .sum())), rel=1e-6)
        assert (hf.attrs["acquisition"], hf.attrs["patient_id"], hf.attrs["site"]) == \
            ("AXT2", "pid-7", "b")
    ds = FastMRISliceDataset(path, "multicoil" if multicoil else "singlecoil")
    info = ds.volumes[0]
    assert (info.padding_left, info.padding_right) == (3, 25)
    assert info.acquisition == "AXT2" and info.max_value == pytest.approx(target.max())
    sample = ds[1]
    np.testing.assert_array_equal(sample.kspace.numpy(), k[1].reshape(-1, 20, 27))
    np.testing.assert_array_equal(sample.target.numpy(), target[1])
