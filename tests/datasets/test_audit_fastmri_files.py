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
