"""Audit: hand-built fastMRI files whose keys are not plain datasets, or whose header is
stored as a one-element array, read as a clear FastMRIFormatError or as the XML."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from fedrecon.datasets import (
    FastMRIFormatError,
    FastMRISliceDataset,
    ismrmrd_header_xml,
    read_volume_info,
)

S, C, H, W = 2, 3, 16, 23  # odd width like fastMRI brain files
XML = ismrmrd_header_xml((H, W, 1), (8, 8), (1, 22), S)


def _write(path, header=XML, target="dataset", mask=None):
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((S, C, H, W)) + 1j * rng.standard_normal((S, C, H, W)))
    with h5py.File(path, "w") as hf:
        hf["kspace"] = k.astype(np.complex64)
        if isinstance(header, str):
            hf["ismrmrd_header"] = np.bytes_(header)
        else:
            hf["ismrmrd_header"] = header
        if target == "dataset":
            hf["reconstruction_rss"] = np.ones((S, 8, 8), np.float32)
            hf.attrs["max"] = 1.0
        elif target == "group":
            hf.create_group("reconstruction_rss")
            hf.attrs["max"] = 1.0
        if mask == "group":
            hf.create_group("mask")
    return path


@pytest.mark.parametrize("kwargs, key", [
    ({"target": "group"}, "'reconstruction_rss'"),
    ({"target": None, "mask": "group"}, "'mask'"),
    ({"header": np.arange(4.0)}, "'ismrmrd_header'"),
])
def test_non_dataset_keys_raise_format_error_naming_file_and_key(tmp_path, kwargs, key):
    path = _write(tmp_path / "file1.h5", **kwargs)
    with pytest.raises(FastMRIFormatError) as info:
        FastMRISliceDataset(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_skip_bad_files_skips_a_file_with_a_group_target(tmp_path):
    _write(tmp_path / "file1.h5")
    bad = _write(tmp_path / "file2.h5", target="group")
    ds = FastMRISliceDataset(tmp_path, skip_bad_files=True)
    assert len(ds) == S and [s.path for s in ds.skipped_files] == [bad]


def test_header_stored_as_one_element_array(tmp_path):
    path = _write(tmp_path / "file1.h5", header=np.array([XML.encode()]))
    info = read_volume_info(path, "multicoil")
    # fastMRI: padding_left = W // 2 - center, padding_right = padding_left + maximum + 1
    assert (info.padding_left, info.padding_right) == (1, 22)
    assert info.encoding_size == (H, W, 1) and info.recon_size == (8, 8, 1)


def test_header_for_another_width_warns_and_keeps_columns_inside(tmp_path):
    """fastMRI reads a file whose header's encoded width differs from the k-space without a
    check; here it is read too, with a warning, the acquired columns clipped to the k-space
    (fastMRI's formula: padding_left = enc_y // 2 - center, padding_right = left + max + 1)."""
    # enc_y = 31 with acquired columns (1, 30): padding [1, 30), width 23 -> [1, 23)
    path = _write(tmp_path / "file1.h5", header=ismrmrd_header_xml((H, 31, 1), (8, 8), (1, 30), S))
    with pytest.warns(UserWarning, match="does not match the k-space width 23"):
        info = read_volume_info(path, "multicoil")
    assert (info.padding_left, info.padding_right) == (1, W)
    with pytest.warns(UserWarning):
        ds = FastMRISliceDataset(path)
    assert len(ds) == S


def test_header_with_no_acquired_column_inside_is_an_error(tmp_path):
    # enc_y = 101, center 0 -> padding_left = 50 >= width 23: nothing acquired in the file
    header = ismrmrd_header_xml((H, 101, 1), (8, 8), (50, 60), S)
    path = _write(tmp_path / "file1.h5", header=header)
    with pytest.raises(FastMRIFormatError, match="none of them inside"):
        read_volume_info(path, "multicoil")
