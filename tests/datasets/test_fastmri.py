"""fastMRI HDF5 files: the writer's layout, the lazy slice dataset, and fastMRI's own loader."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as etree

import h5py
import numpy as np
import pytest
import torch
from fedrecon.datasets import (
    FastMRIFormatError,
    FastMRIReadError,
    FastMRISliceDataset,
    MRISample,
    collate_mri_samples,
    ismrmrd_header_xml,
    parse_ismrmrd_header,
    read_volume_info,
    write_fastmri_volume,
)
from fedrecon.operators import EquispacedFractionMask, RandomMask

NS = {"m": "http://www.ismrm.org/ISMRMRD"}


def _text(root, path):
    return root.find("./" + "/".join(f"m:{p}" for p in path), NS).text


# -- writer --------------------------------------------------------------------------------
def test_writer_layout_and_header(fastmri_files, helpers):
    vol = fastmri_files.volumes["file1000001.h5"]
    with h5py.File(vol.path, "r") as hf:
        assert set(hf.keys()) == {"kspace", "reconstruction_rss", "ismrmrd_header"}
        assert hf["kspace"].dtype == np.complex64
        assert hf["kspace"].shape == (3, 4, 32, 24)
        assert hf["reconstruction_rss"].dtype == np.float32
        assert hf["reconstruction_rss"].shape == (3, 16, 16)
        np.testing.assert_array_equal(hf["kspace"][()], vol.kspace)
        assert hf.attrs["max"] == pytest.approx(float(vol.target.max()))
        assert hf.attrs["norm"] == pytest.approx(float(np.linalg.norm(vol.target)), rel=1e-6)
        assert hf.attrs["acquisition"] == "CORPD_FBK"
        assert hf.attrs["patient_id"] == "p1"
        xml = hf["ismrmrd_header"][()]
    root = etree.fromstring(xml)  # independent parse, hand-written expectations
    assert root.tag == "{http://www.ismrm.org/ISMRMRD}ismrmrdHeader"
    enc = ["encoding", "encodedSpace", "matrixSize"]
    rec = ["encoding", "reconSpace", "matrixSize"]
    assert [_text(root, enc + [a]) for a in "xyz"] == ["32", "24", "1"]
    assert [_text(root, rec + [a]) for a in "xyz"] == ["16", "16", "1"]
    assert root.find("./m:encoding/m:encodedSpace/m:fieldOfView_mm", NS) is not None
    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    # acquired columns [2, 21): center = 24 // 2 - 2 = 10, maximum = 21 - 2 - 1 = 18
    assert (_text(root, lims + ["minimum"]), _text(root, lims + ["maximum"]),
            _text(root, lims + ["center"])) == ("0", "18", "10")
    info = parse_ismrmrd_header(xml)
    assert (info.padding_left, info.padding_right) == helpers.ACQUIRED
    assert info.encoding_size == (32, 24, 1) and info.recon_size == (16, 16, 1)


def test_writer_test_file_layout(fastmri_files):
    vol = fastmri_files.volumes["file1000004.h5"]
    with h5py.File(vol.path, "r") as hf:
        assert set(hf.keys()) == {"kspace", "mask", "ismrmrd_header"}
        np.testing.assert_array_equal(hf["mask"][()], vol.mask)
        assert "max" not in hf.attrs and hf.attrs["acceleration"] == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"kspace": np.zeros((3, 32, 24), np.float32)}, "'kspace' must be complex"),
    ({"kspace": np.zeros((32, 24), np.complex64)}, r"'kspace' must have shape \(S, C, H, W\)"),
    ({"reconstruction_rss": np.zeros((3, 8, 8), np.float32)}, r"'reconstruction_rss'.*\(3, 16, 16\)"),
    ({"reconstruction_rss": np.zeros((3, 16, 16), np.complex64)}, "'reconstruction_rss' must be a real"),
    ({"mask": np.ones(23)}, r"'mask' must have shape \(W,\) = \(24,\)"),
    ({"encoding_size": (32, 20, 1)}, "'encoding_size'"),
    ({"attrs": {"max": 1.0}}, "'attrs' must not set 'max'"),
])
def test_writer_validates_arguments(tmp_path, kwargs, match):
    args = {"kspace": np.zeros((3, 2, 32, 24), np.complex64), "recon_size": (16, 16)}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        write_fastmri_volume(tmp_path / "x.h5", args.pop("kspace"), **args)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_overwrite(tmp_path):
    k = np.ones((1, 2, 8, 8), np.complex64)
    write_fastmri_volume(tmp_path / "a.h5", k, recon_size=(4, 4))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_fastmri_volume(tmp_path / "a.h5", 2 * k, recon_size=(4, 4))
    write_fastmri_volume(tmp_path / "a.h5", 2 * k, recon_size=(4, 4), overwrite=True)
    with h5py.File(tmp_path / "a.h5", "r") as hf:
        assert hf["kspace"][0, 0, 0, 0] == 2


def test_writer_is_atomic(tmp_path, monkeypatch):
    k = np.ones((1, 2, 8, 8), np.complex64)
    write_fastmri_volume(tmp_path / "old.h5", k, recon_size=(4, 4))
    real = h5py.Group.create_dataset

    def failing(self, name, *args, **kwargs):
        if name == "ismrmrd_header":  # after kspace was written
            raise RuntimeError("simulated crash mid-write")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        write_fastmri_volume(tmp_path / "new.h5", k, recon_size=(4, 4))
    with pytest.raises(RuntimeError, match="simulated"):
        write_fastmri_volume(tmp_path / "old.h5", 3 * k, recon_size=(4, 4), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]  # no temp, no new.h5
    with h5py.File(tmp_path / "old.h5", "r") as hf:  # the old file is intact
        np.testing.assert_array_equal(hf["kspace"][()], k)


# -- fastMRI's own SliceDataset reads our files -------------------------------------------
@pytest.mark.parametrize("folder, challenge", [("multicoil", "multicoil"),
                                               ("singlecoil", "singlecoil"),
                                               ("test", "multicoil")])
def test_fastmri_slicedataset_loads_our_files(fastmri_ref, fastmri_files, folder, challenge):
    ref = fastmri_ref.mri_data.SliceDataset(getattr(fastmri_files, folder), challenge)
    ours = FastMRISliceDataset(getattr(fastmri_files, folder), challenge)
    assert len(ref) == len(ours)
    for i, (fname, slice_ind, meta) in enumerate(ref.raw_samples):
        info = ours.volumes[ours.samples[i][0]]
        assert (fname.name, slice_ind) == (info.path.name, ours.samples[i][1])
        assert (meta["padding_left"], meta["padding_right"]) == \
            (info.padding_left, info.padding_right)
        assert meta["encoding_size"] == info.encoding_size
        assert meta["recon_size"] == info.recon_size
        kspace, mask, target, attrs, name, dataslice = ref[i]
        vol = fastmri_files.volumes[name]
        np.testing.assert_array_equal(kspace, vol.kspace[dataslice])
        if vol.target is None:
            assert target is None
            np.testing.assert_array_equal(mask, vol.mask)
        else:
            np.testing.assert_array_equal(target, vol.target[dataslice])
            assert attrs["max"] == pytest.approx(vol.target.max())


@pytest.mark.parametrize("ours_cls, ref_name", [(RandomMask, "RandomMaskFunc"),
                                                (EquispacedFractionMask,
                                                 "EquispacedMaskFractionFunc")])
def test_masks_match_fastmri_varnet_transform(fastmri_ref, fastmri_files, ours_cls, ref_name):
    ref_func = getattr(fastmri_ref.subsample, ref_name)([0.2], [3])
    transform = fastmri_ref.transforms.VarNetDataTransform(mask_func=ref_func)
    ref = fastmri_ref.mri_data.SliceDataset(fastmri_files.multicoil, "multicoil",
                                            transform=transform)
    ours = FastMRISliceDataset(fastmri_files.multicoil, "multicoil", mask=ours_cls([0.2], [3]))
    for i in range(len(ref)):
        r, s = ref[i], ours[i]
        np.testing.assert_array_equal(s.mask.reshape(-1).numpy(),
                                      r.mask.reshape(-1).float().numpy())
        np.testing.assert_array_equal(s.kspace.numpy(),
                                      torch.view_as_complex(r.masked_kspace).numpy())
        assert s.num_low_frequencies == r.num_low_frequencies
        assert s.crop_size == tuple(r.crop_size)
        assert s.max_value == pytest.approx(r.max_value)
        np.testing.assert_array_equal(s.target.numpy(), r.target.numpy())


def test_test_file_mask_matches_fastmri(fastmri_ref, fastmri_files):
    transform = fastmri_ref.transforms.VarNetDataTransform(mask_func=None)
    ref = fastmri_ref.mri_data.SliceDataset(fastmri_files.test, "multicoil", transform=transform)
    ours = FastMRISliceDataset(fastmri_files.test, "multicoil", mask=RandomMask([0.08], [4]))
    for i in range(len(ref)):
        r, s = ref[i], ours[i]
        np.testing.assert_array_equal(s.mask.reshape(-1).numpy(),
                                      r.mask.reshape(-1).float().numpy())
        np.testing.assert_array_equal(s.kspace.numpy(),
                                      torch.view_as_complex(r.masked_kspace).numpy())


# -- our loader against independent numpy values -------------------------------------------
def _expected_mask(func, fname, helpers):
    """The operators' mask for the volume's seed, zeroed outside the acquired columns."""
    m = func((helpers.N_COILS, helpers.HEIGHT, helpers.WIDTH),
             seed=tuple(map(ord, fname))).mask.reshape(-1).numpy().copy()
    m[: helpers.ACQUIRED[0]] = 0
    m[helpers.ACQUIRED[1]:] = 0
    return m


def test_multicoil_samples(fastmri_files, helpers):
    ds = FastMRISliceDataset(fastmri_files.multicoil, "multicoil", mask=RandomMask([0.2], [3]))
    assert len(ds) == 6
    masks = {}
    for i in range(len(ds)):
        s = ds[i]
        assert isinstance(s, MRISample)
        vol = fastmri_files.volumes[s.fname]
        assert s.kspace.shape == (4, 32, 24) and s.kspace.dtype == torch.complex64
        assert s.mask.shape == (1, 1, 24) and s.mask.dtype == torch.float32
        mask = _expected_mask(RandomMask([0.2], [3]), s.fname, helpers)
        np.testing.assert_array_equal(s.mask.reshape(-1).numpy(), mask)
        np.testing.assert_array_equal(s.kspace.numpy(), vol.kspace[s.slice_num] * mask)
        # the target is the stored one; it equals an independent numpy RSS + crop
        np.testing.assert_allclose(s.target.numpy(),
                                   helpers.np_rss_target(vol.kspace, (16, 16))[s.slice_num],
                                   rtol=1e-5, atol=1e-6)
        assert s.crop_size == (16, 16) and s.coil_maps is None
        assert s.max_value == pytest.approx(float(vol.target.max()))
        assert s.num_low_frequencies == 5
        np.testing.assert_allclose(s.protocol.numpy(), [3.0, 0.2, 4.0])
        masks.setdefault(s.fname, []).append(s.mask)
    assert ds[3].acquisition == "CORPDFS_FBK"
    for per_slice in masks.values():  # one mask per volume
        assert len(per_slice) == 3 and all(torch.equal(m, per_slice[0]) for m in per_slice)
        assert per_slice[0][..., :2].abs().sum() == 0 and per_slice[0][..., 21:].abs().sum() == 0
    a, b = (masks[f][0] for f in sorted(masks))
    assert not torch.equal(a, b)
    # same mask on a new dataset (every epoch, every worker)
    again = FastMRISliceDataset(fastmri_files.multicoil, "multicoil", mask=RandomMask([0.2], [3]))
    assert torch.equal(again[0].mask, ds[0].mask)


def test_fully_sampled_without_mask_function(fastmri_files):
    ds = FastMRISliceDataset(fastmri_files.multicoil, "multicoil")
    s = ds[1]
    expected = np.zeros(24, np.float32)
    expected[2:21] = 1
    np.testing.assert_array_equal(s.mask.reshape(-1).numpy(), expected)
    np.testing.assert_array_equal(s.kspace.numpy(),
                                  fastmri_files.volumes[s.fname].kspace[1])
    np.testing.assert_allclose(s.protocol.numpy(), [1.0, 1.0, 4.0])


def test_singlecoil(fastmri_files, helpers):
    ds = FastMRISliceDataset(fastmri_files.singlecoil, "singlecoil",
                             mask=EquispacedFractionMask([0.2], [3]))
    vol = fastmri_files.volumes["file1000003.h5"]
    s = ds[2]
    assert s.kspace.shape == (1, 32, 24)
    mask = _expected_mask(EquispacedFractionMask([0.2], [3]), s.fname, helpers)
    np.testing.assert_array_equal(s.kspace[0].numpy(), vol.kspace[2] * mask)
    np.testing.assert_allclose(s.target.numpy(), np.abs(helpers.np_crop(
        helpers.np_ifft2c(vol.kspace[2]), (16, 16))), rtol=1e-5, atol=1e-6)
    assert s.protocol[2] == 1
    with pytest.raises(FastMRIFormatError, match=r"\(S, H, W\) for the singlecoil"):
        FastMRISliceDataset(fastmri_files.multicoil, "singlecoil")


def test_test_files_keep_their_mask(fastmri_files):
    ds = FastMRISliceDataset(fastmri_files.test, "multicoil", mask=RandomMask([0.2], [3]))
    vol = fastmri_files.volumes["file1000004.h5"]
    for i in range(3):
        s = ds[i]
        np.testing.assert_array_equal(s.mask.reshape(-1).numpy(), vol.mask)
        np.testing.assert_array_equal(s.kspace.numpy(), vol.kspace[i])
        assert s.target is None and s.max_value == 0.0
        assert s.num_low_frequencies == 6
        np.testing.assert_allclose(s.protocol.numpy(), [4.0, 6 / 24, 4.0])


def test_crop_size_and_protocol_override(fastmri_files, helpers):
    ds = FastMRISliceDataset(fastmri_files.multicoil, "multicoil", crop_size=(9, 12),
                             protocol=[1.0, 2.0])
    s = ds[0]
    vol = fastmri_files.volumes[s.fname]
    np.testing.assert_array_equal(s.target.numpy(), helpers.np_crop(vol.target[0], (9, 12)))
    assert s.crop_size == (9, 12)
    np.testing.assert_array_equal(s.protocol.numpy(), [1.0, 2.0])
    too_big = FastMRISliceDataset(fastmri_files.multicoil, "multicoil", crop_size=(20, 16))
    with pytest.raises(ValueError, match="exceeds the stored target"):
        too_big[0]


def test_sample_rates(fastmri_files):
    root = fastmri_files.multicoil
    a = FastMRISliceDataset(root, sample_rate=0.5, seed=3)
    b = FastMRISliceDataset(root, sample_rate=0.5, seed=3)
    assert len(a) == 3 and a.samples == b.samples
    v = FastMRISliceDataset(root, volume_sample_rate=0.5, seed=1)
    assert len(v) == 3 and len({vol for vol, _ in v.samples}) == 1
    assert len(FastMRISliceDataset(root, volume_sample_rate=1.0)) == 6
    with pytest.raises(ValueError, match="not both"):
        FastMRISliceDataset(root, sample_rate=0.5, volume_sample_rate=0.5)
    with pytest.raises(ValueError, match="'sample_rate' must lie in"):
        FastMRISliceDataset(root, sample_rate=0.0)


def test_collate(fastmri_files):
    ds = FastMRISliceDataset(fastmri_files.multicoil, "multicoil", mask=RandomMask([0.2], [3]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_mri_samples)
    batch = next(iter(loader))
    assert batch.kspace.shape == (2, 4, 32, 24) and batch.target.shape == (2, 16, 16)
    assert batch.coil_maps is None and batch.slice_num == [0, 1]
    assert batch.max_value.shape == (2,) and batch.protocol.shape == (2, 3)


# -- bad input -----------------------------------------------------------------------------
def _copy_good(fastmri_files, tmp_path, name="file1000001.h5"):
    dst = tmp_path / name
    shutil.copy(fastmri_files.volumes["file1000001.h5"].path, dst)
    return dst


def _edit(path, fn):
    with h5py.File(path, "a") as hf:
        fn(hf)


def _replace_header(xml):
    def fn(hf):
        del hf["ismrmrd_header"]
        hf["ismrmrd_header"] = np.bytes_(xml)
    return fn


GOOD_XML = ismrmrd_header_xml((32, 24, 1), (16, 16), (2, 21), 3)


@pytest.mark.parametrize("edit, error, match", [
    (lambda hf: hf.__delitem__("kspace"), FastMRIFormatError, "missing dataset 'kspace'"),
    (lambda hf: hf.__delitem__("reconstruction_rss"), FastMRIFormatError,
     "missing dataset 'reconstruction_rss'"),
    (lambda hf: (hf.__delitem__("kspace"), hf.create_dataset("kspace", data=np.zeros(
        (3, 4, 32, 24), np.float32))), FastMRIFormatError, "'kspace' must be a complex64"),
    (lambda hf: (hf.__delitem__("kspace"), hf.create_dataset("kspace", data=np.zeros(
        (3, 32, 24), np.complex64))), FastMRIFormatError, r"'kspace' must have shape"),
    (lambda hf: hf.__delitem__("ismrmrd_header"), FastMRIFormatError,
     "missing dataset 'ismrmrd_header'"),
    (_replace_header(GOOD_XML.replace("<center>10</center>", "")), FastMRIFormatError,
     "no encoding/encodingLimits/kspace_encoding_step_1/center"),
    (_replace_header(GOOD_XML.replace(' xmlns="http://www.ismrm.org/ISMRMRD"', "")),
     FastMRIFormatError, "namespace http://www.ismrm.org/ISMRMRD"),
    (_replace_header("<ismrmrdHeader"), FastMRIFormatError, "not valid XML"),
    (lambda hf: hf.attrs.__delitem__("max"), FastMRIFormatError, "attribute 'max'"),
])
def test_bad_files_raise_naming_file(fastmri_files, tmp_path, edit, error, match):
    path = _copy_good(fastmri_files, tmp_path)
    _edit(path, edit)
    with pytest.raises(error, match=match) as info:
        FastMRISliceDataset(tmp_path, "multicoil")
    assert str(path) in str(info.value)


def test_truncated_and_garbage_files(fastmri_files, tmp_path):
    path = _copy_good(fastmri_files, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastMRIReadError) as info:
        read_volume_info(path, "multicoil")
    assert str(path) in str(info.value) and isinstance(info.value, OSError)
    path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(OSError, match="cannot read as a fastMRI HDF5"):
        FastMRISliceDataset(path)


def test_skip_bad_files(fastmri_files, tmp_path, caplog):
    _copy_good(fastmri_files, tmp_path, "file1000001.h5")
    bad = tmp_path / "file9999999.h5"
    bad.write_bytes(b"\x89HDF\r\n garbage")
    with pytest.raises(FastMRIReadError, match="file9999999"):
        FastMRISliceDataset(tmp_path)
    with caplog.at_level("WARNING"):
        ds = FastMRISliceDataset(tmp_path, skip_bad_files=True)
    assert len(ds) == 3
    assert [s.path for s in ds.skipped_files] == [bad]
    assert "file9999999.h5" in caplog.text


def test_empty_or_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fastMRI .h5 files"):
        FastMRISliceDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        FastMRISliceDataset(tmp_path / "nope.h5")
    with pytest.raises(ValueError, match="'challenge'"):
        FastMRISliceDataset(tmp_path, "triplecoil")
