"""DICOM CT series import: ordering, rescale, consistency checks, one real pydicom slice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fedrecon.datasets import CTAcquisition, CTSliceDataset, import_dicom_series, read_ct_volume

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SERIES_UID = generate_uid()
ROWS, COLS = 12, 16


def _write_slice(path: Path, hu: np.ndarray, *, slope: float, intercept: float,
                 position: list[float] | None, instance: int | None,
                 orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
                 spacing: tuple[float, float] = (0.7, 0.8), modality: str = "CT") -> None:
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    assert np.allclose(stored * slope + intercept, hu)  # test data exactly representable
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = SERIES_UID
    ds.Modality = modality
    ds.PatientID = "ANON123"
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = position
        ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, n: int = 5, seed: int = 0, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Write ``n`` slices in shuffled order; return the HU volume and positions, sorted."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    hu = rng.integers(-1000, 1500, size=(n, ROWS, COLS)).astype(np.float64) * 2.0
    z = 100.0 - 2.5 * np.arange(n)[::-1]  # ascending positions
    perm = rng.permutation(n)
    for name_idx, k in enumerate(perm):
        slope, intercept = (1.0, -1024.0) if k % 2 else (2.0, -1000.0)
        _write_slice(folder / f"IM{name_idx:04d}", hu[k], slope=slope, intercept=intercept,
                     position=[-80.0, -90.0, float(z[k])], instance=n - k,  # reversed
                     **kw)
    return hu, z


def test_import_sorts_by_position_and_rescales(tmp_path: Path) -> None:
    hu, z = _series(tmp_path / "series")
    out = import_dicom_series(tmp_path / "series", tmp_path / "vol.h5")
    vol = read_ct_volume(out)
    np.testing.assert_array_equal(vol.image, hu.astype(np.float32))
    np.testing.assert_allclose(vol.slice_positions, z)
    assert vol.units == "HU" and vol.pixel_spacing == (0.7, 0.8) and vol.patient_id == "ANON123"
    with pytest.raises(FileExistsError, match="vol.h5"):
        import_dicom_series(tmp_path / "series", out)
    import_dicom_series(tmp_path / "series", out, overwrite=True)


def test_import_projects_position_on_slice_normal(tmp_path: Path) -> None:
    # sagittal slices: rows along +y, columns along -z, normal = y x (-z) = -x
    folder = tmp_path / "sag"
    folder.mkdir()
    rng = np.random.default_rng(1)
    hu = rng.integers(-500, 500, size=(4, ROWS, COLS)).astype(np.float64)
    xs = [30.0, 10.0, 20.0, 0.0]  # x of each slice; ascending -x means descending x
    for k in rng.permutation(4):
        _write_slice(folder / f"s{k}.dcm", hu[k], slope=1.0, intercept=0.0,
                     position=[xs[k], 5.0, 7.0], instance=None, orientation=(0, 1, 0, 0, 0, -1))
    vol = read_ct_volume(import_dicom_series(folder, tmp_path / "sag.h5"))
    order = np.argsort([-x for x in xs])
    np.testing.assert_array_equal(vol.image, hu[order].astype(np.float32))
    np.testing.assert_allclose(vol.slice_positions, sorted(-x for x in xs))


def test_instance_number_fallback(tmp_path: Path) -> None:
    folder = tmp_path / "noipp"
    folder.mkdir()
    hu = np.stack([np.full((ROWS, COLS), 10.0 * k) for k in range(4)])
    for k in (2, 0, 3, 1):
        _write_slice(folder / f"x{3 - k}", hu[k], slope=1.0, intercept=0.0, position=None,
                     instance=k + 1)
    vol = read_ct_volume(import_dicom_series(folder, tmp_path / "v.h5"))
    np.testing.assert_array_equal(vol.image, hu.astype(np.float32))
    assert vol.slice_positions is None


def test_mixed_sizes_name_the_file(tmp_path: Path) -> None:
    _series(tmp_path / "s", n=3)
    _write_slice(tmp_path / "s" / "ZZ_odd", np.zeros((ROWS + 2, COLS)), slope=1.0, intercept=0.0,
                 position=[0.0, 0.0, 50.0], instance=9)
    with pytest.raises(ValueError, match=rf"ZZ_odd.*\({ROWS + 2}, {COLS}\).*\({ROWS}, {COLS}\)"):
        import_dicom_series(tmp_path / "s", tmp_path / "v.h5")
    assert not (tmp_path / "v.h5").exists()


def test_other_inconsistencies_name_the_file(tmp_path: Path) -> None:
    _series(tmp_path / "a", n=2)
    _write_slice(tmp_path / "a" / "ZZ_spacing", np.zeros((ROWS, COLS)), slope=1.0, intercept=0.0,
                 position=[0.0, 0.0, 50.0], instance=9, spacing=(0.5, 0.5))
    with pytest.raises(ValueError, match="ZZ_spacing.*PixelSpacing"):
        import_dicom_series(tmp_path / "a", tmp_path / "v.h5")
    _series(tmp_path / "b", n=2)
    _write_slice(tmp_path / "b" / "ZZ_mr", np.zeros((ROWS, COLS)), slope=1.0, intercept=0.0,
                 position=[0.0, 0.0, 50.0], instance=9, modality="MR")
    with pytest.raises(ValueError, match="ZZ_mr.*Modality"):
        import_dicom_series(tmp_path / "b", tmp_path / "v.h5")
    _series(tmp_path / "c", n=2)
    (tmp_path / "c" / "ZZ_notes.txt").write_text("not dicom")
    with pytest.raises(ValueError, match="ZZ_notes.txt"):
        import_dicom_series(tmp_path / "c", tmp_path / "v.h5")
    _series(tmp_path / "d", n=2)
    _write_slice(tmp_path / "d" / "ZZ_dup", np.zeros((ROWS, COLS)), slope=1.0, intercept=0.0,
                 position=[-80.0, -90.0, 100.0], instance=9)
    dup = "ZZ_dup.*share ImagePositionPatient|share ImagePositionPatient.*ZZ_dup"
    with pytest.raises(ValueError, match=dup):
        import_dicom_series(tmp_path / "d", tmp_path / "v.h5")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no DICOM"):
        import_dicom_series(tmp_path / "e", tmp_path / "v.h5")


def test_real_pydicom_ct_slice_then_dataset(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm", download=False)  # ships inside the wheel
    if src is None:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(src, folder / "CT_small.dcm")
    vol = read_ct_volume(import_dicom_series(folder, tmp_path / "real.h5"))
    assert vol.image.shape == (1, 128, 128)
    assert vol.pixel_spacing == pytest.approx((0.661468, 0.661468))
    assert -1100 < vol.image.min() < -500 < 200 < vol.image.max() < 3100  # air and bone in HU
    acq = CTAcquisition(n_views=16, image_size=32, pixel_spacing=128 * 0.661468 / 32,
                        det_spacing=3.0, photons=1e5)
    sample = CTSliceDataset(tmp_path / "real.h5", acq)[0]
    assert sample.target.shape == (32, 32) and float(sample.target.max()) > 0.0192
    assert np.isfinite(sample.sinogram.numpy()).all()
