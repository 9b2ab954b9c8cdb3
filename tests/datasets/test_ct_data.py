"""CT data: acquisitions, the HDF5 volume layout, on-the-fly simulation, phantoms."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fedrecon.datasets import (
    CTAcquisition,
    CTFileError,
    CTSliceDataset,
    collate_ct_samples,
    hu_to_attenuation,
    patient_split,
    random_ellipses,
    read_ct_volume,
    write_ct_volume,
    write_phantom_volumes,
)
from fedrecon.operators import FanBeam2D, ParallelBeam2D

N = 32  # image size of the test volumes
PS = 10.0  # mm: a 320 mm field of view


def _acq(**kw) -> CTAcquisition:
    base = {"n_views": 24, "image_size": N, "pixel_spacing": PS, "det_spacing": PS}
    return CTAcquisition(**{**base, **kw})


def _fan(**kw) -> CTAcquisition:
    return _acq(geometry="fan", source_distance=500.0, detector_distance=300.0,
                det_spacing=16.0, det_count=40, **kw)


def _hu_volume(n_slices: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:N, :N]
    body = ((xx - N / 2) ** 2 / (0.4 * N) ** 2 + (yy - N / 2) ** 2 / (0.3 * N) ** 2) <= 1
    vol = np.full((n_slices, N, N), -1024.0, dtype=np.float32)  # scanner padding below air
    vol[:, body] = 40.0
    vol += rng.normal(0, 30, vol.shape).astype(np.float32) * body
    vol[:, N // 2 - 2 : N // 2 + 2, N // 2 - 3 : N // 2 + 1] = 900.0  # "bone"
    return vol


@pytest.fixture
def ct_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ct"
    for i in range(2):
        write_ct_volume(root / f"vol{i}.h5", _hu_volume(3, i), units="HU",
                        pixel_spacing=(0.7, 0.7), slice_positions=[0.0, 2.5, 5.0],
                        patient_id=f"p{i}")
    return root


# --- layout and units -----------------------------------------------------------------
def test_write_read_round_trip_is_atomic(tmp_path: Path) -> None:
    vol = _hu_volume(3, 0)
    path = write_ct_volume(tmp_path / "v.h5", torch.from_numpy(vol), units="HU",
                           pixel_spacing=(0.7, 0.8), slice_positions=[1.0, 2.0, 3.0])
    got = read_ct_volume(path)
    np.testing.assert_array_equal(got.image, vol)
    assert got.units == "HU" and got.pixel_spacing == (0.7, 0.8) and got.patient_id == "v"
    np.testing.assert_array_equal(got.slice_positions, [1.0, 2.0, 3.0])
    with h5py.File(path) as f:
        assert f["image"].dtype == np.float32 and f["image"].chunks == (1, N, N)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.h5"]  # no temporary file left
    with pytest.raises(FileExistsError, match="v.h5"):
        write_ct_volume(path, vol, units="HU", pixel_spacing=0.7)
    write_ct_volume(path, vol[:1], units="attenuation_per_mm", pixel_spacing=0.7, overwrite=True)
    assert read_ct_volume(path).image.shape == (1, N, N)
    with pytest.raises(ValueError, match=r"\(S, H, W\)"):
        write_ct_volume(tmp_path / "w.h5", vol[0], units="HU", pixel_spacing=0.7)
    with pytest.raises(ValueError, match="units"):
        write_ct_volume(tmp_path / "w.h5", vol, units="mu", pixel_spacing=0.7)


def test_hu_to_attenuation() -> None:
    hu = np.array([-2000.0, -1024.0, -1000.0, 0.0, 1000.0])
    np.testing.assert_allclose(hu_to_attenuation(hu), [0, 0, 0, 0.0192, 0.0384], rtol=1e-6)
    t = hu_to_attenuation(torch.tensor(hu, dtype=torch.float32))
    assert t.dtype == torch.float32 and float(t.min()) == 0.0


# --- acquisition ----------------------------------------------------------------------
def test_acquisition_defaults_and_config() -> None:
    par, fan = _acq(), _fan()
    assert par.angle_range == pytest.approx(math.pi)
    assert fan.angle_range == pytest.approx(2 * math.pi)
    assert isinstance(par.det_count, int) and par.det_count >= math.ceil(math.sqrt(2) * N)
    assert par.image_size == (N, N)
    assert CTAcquisition.from_dict(fan.to_dict()) == fan
    with pytest.raises(ValueError, match="'n_veiws'"):
        CTAcquisition.from_dict({"n_veiws": 10})


@pytest.mark.parametrize("bad, field", [
    ({"geometry": "cone"}, "geometry"),
    ({"n_views": 0}, "n_views"),
    ({"angle_range": -1.0}, "angle_range"),
    ({"photons": 0.0}, "photons"),
    ({"electronic_noise": 5.0}, "electronic_noise"),  # noise without photons
    ({"det_spacing": 0.0}, "det_spacing"),
    ({"source_distance": 500.0}, "source_distance"),  # parallel beam has no source
    ({"geometry": "fan", "detector_distance": 100.0}, "source_distance"),
    ({"geometry": "fan", "source_distance": 100.0, "detector_distance": 100.0}, "source_distance"),
])
def test_acquisition_errors_name_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"CTAcquisition.{field}"):
        _acq(**bad)


def test_make_operator_is_cached_and_keeps_field_of_view() -> None:
    op = _acq().make_operator()
    assert isinstance(op, ParallelBeam2D) and op is _acq().make_operator()  # equal acquisitions
    assert isinstance(_fan().make_operator(), FanBeam2D)
    half = _acq().make_operator(N // 2)
    assert half.image_size == (N // 2, N // 2)
    assert half.geometry.pixel_spacing == pytest.approx(2 * PS)
    with pytest.raises(ValueError, match="image_size"):
        _acq().make_operator((N, N // 2))


def test_sparse_view_and_limited_angle_angles() -> None:
    sparse = _acq(n_views=8)
    np.testing.assert_allclose(sparse.make_operator().geometry.angles,
                               np.arange(8) * math.pi / 8, atol=1e-12)
    limited = _acq(n_views=20, angle_range=2 * math.pi / 3)
    angles = np.asarray(limited.make_operator().geometry.angles)
    assert angles[0] == 0.0 and angles.max() < 2 * math.pi / 3
    np.testing.assert_allclose(np.diff(angles), 2 * math.pi / 3 / 20, atol=1e-12)
    short = _fan(angle_range=math.pi + 1.0)
    assert short.uses_short_scan() and not _fan().uses_short_scan()


def test_protocol_vectors_differ_between_acquisitions() -> None:
    acqs = [_acq(), _acq(n_views=8), _acq(angle_range=2.0), _acq(photons=1e4), _acq(photons=1e5),
            _fan(), _fan(photons=1e4)]
    vecs = torch.stack([a.protocol_vector() for a in acqs])
    assert vecs.dtype == torch.float32 and vecs.shape == (len(acqs), 8)
    assert len({tuple(v.tolist()) for v in vecs}) == len(acqs)
    assert vecs[3, 5] == pytest.approx(4.0) and vecs[0, 3] == 0 and vecs[5, 7] == 1.0
    assert vecs[5, 3] == 500.0 and vecs[5, 4] == 300.0


# --- dataset --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_acq, _fan, lambda: _acq(n_views=6, angle_range=1.5)],
                         ids=["parallel", "fan", "limited"])
def test_noiseless_sinogram_equals_operator_of_stored_image(ct_dir: Path, make) -> None:
    acq = make()
    ds = CTSliceDataset(ct_dir, acq)
    assert len(ds) == 6
    sample = ds[4]  # vol1.h5, slice 1 (files sorted by name)
    assert (sample.fname, sample.slice_num) == ("vol1.h5", 1)
    with h5py.File(ct_dir / "vol1.h5") as f:
        hu = torch.from_numpy(f["image"][1])
    mu = torch.clamp(0.0192 * (1.0 + hu / 1000.0), min=0.0)
    angles = torch.arange(acq.n_views, dtype=torch.float64) * acq.angle_range / acq.n_views
    if acq.geometry == "parallel":
        op = ParallelBeam2D(N, angles, acq.det_count, PS, pixel_spacing=PS)
    else:
        op = FanBeam2D(N, angles, 40, 16.0, source_distance=500.0, detector_distance=300.0,
                       pixel_spacing=PS)
    torch.testing.assert_close(sample.target, mu)
    torch.testing.assert_close(sample.sinogram, op(mu), rtol=1e-5, atol=1e-6)
    assert sample.sinogram.dtype == torch.float32 and sample.target.dtype == torch.float32
    assert sample.sinogram.shape == (acq.n_views, acq.det_count)
    torch.testing.assert_close(sample.protocol, acq.protocol_vector())
    assert sample.acquisition is acq and sample.fbp is None


def test_per_slice_noise_is_reproducible_and_differs(tmp_path: Path) -> None:
    same = np.repeat(_hu_volume(1, 0), 3, axis=0)  # three identical slices
    write_ct_volume(tmp_path / "a.h5", same, units="HU", pixel_spacing=0.7)
    acq = _acq(photons=1e4, electronic_noise=2.0)
    ds = CTSliceDataset(tmp_path, acq, seed=3)
    s0, s1 = ds[0].sinogram, ds[1].sinogram
    torch.testing.assert_close(ds[0].sinogram, s0, rtol=0, atol=0)
    again = CTSliceDataset(tmp_path, acq, seed=3)[0].sinogram  # a new dataset, same seed
    torch.testing.assert_close(again, s0, rtol=0, atol=0)
    assert not torch.equal(s0, s1)  # same image, other slice: other noise
    assert not torch.equal(CTSliceDataset(tmp_path, acq, seed=4)[0].sinogram, s0)


def test_noise_variance_matches_photon_count(ct_dir: Path) -> None:
    clean = CTSliceDataset(ct_dir, _acq(n_views=48))[0].sinogram.double()
    photons = 1e4
    noisy = CTSliceDataset(ct_dir, _acq(n_views=48, photons=photons))[0].sinogram.double()
    # delta method: var(-log(N / I0)) = 1 / (I0 exp(-p)) for N ~ Poisson(I0 exp(-p))
    z = (noisy - clean) * torch.sqrt(photons * torch.exp(-clean))
    assert float(z.mean()) == pytest.approx(0.0, abs=0.1)
    assert float(z.var()) == pytest.approx(1.0, rel=0.15)
    high = CTSliceDataset(ct_dir, _acq(n_views=48, photons=1e10))[0].sinogram.double()
    assert float((high - clean).abs().max()) < 1e-3 < float((noisy - clean).abs().max())


def test_resample_fbp_and_collate(ct_dir: Path) -> None:
    acq = _acq(n_views=48)
    ds = CTSliceDataset(ct_dir, acq, image_size=N // 2, return_fbp=True)
    s = ds[0]
    assert s.target.shape == s.fbp.shape == (N // 2, N // 2) and ds.image_size == (N // 2, N // 2)
    assert ds.operator.geometry.pixel_spacing == pytest.approx(2 * PS)
    assert s.sinogram.shape == (48, acq.det_count)
    full = CTSliceDataset(ct_dir, acq, return_fbp=True)[0]
    err = torch.linalg.vector_norm(full.fbp - full.target) / torch.linalg.vector_norm(full.target)
    assert float(err) < 0.3
    batch = collate_ct_samples([ds[0], ds[5]])
    assert batch.sinogram.shape == (2, 48, acq.det_count) and batch.fbp.shape == (2, N // 2, N // 2)
    assert batch.fname == ["vol0.h5", "vol1.h5"] and batch.slice_num.tolist() == [0, 2]
    with pytest.raises(ValueError, match="acquisition"):
        collate_ct_samples([ds[0], CTSliceDataset(ct_dir, _acq())[0]])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_ct_samples)
    assert [b.target.shape[0] for b in loader] == [4, 2]


def test_patient_level_split(tmp_path: Path) -> None:
    vol = _hu_volume(1, 0)
    for i in range(40):
        write_ct_volume(tmp_path / f"v{i:02d}.h5", vol, units="HU", pixel_spacing=1.0,
                        patient_id=f"patient{i // 2}")  # two volumes per patient
    parts = {s: CTSliceDataset(tmp_path, _acq(), split=s) for s in ("train", "val", "test")}
    names = {s: {v.path.name for v in d.volumes} for s, d in parts.items()}
    assert sum(len(n) for n in names.values()) == 40 and not names["train"] & names["test"]
    for s, d in parts.items():
        assert all(patient_split(v.patient_id) == s for v in d.volumes)
    with pytest.raises(ValueError, match="split"):
        CTSliceDataset(tmp_path, _acq(), split="training")


# --- errors ---------------------------------------------------------------------------
def test_empty_folder_error_names_folder(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("no volumes here")
    with pytest.raises(FileNotFoundError, match=r"empty_dir.*no \.h5"):
        CTSliceDataset(tmp_path / "empty_dir", _acq())


def test_bad_files_are_named(ct_dir: Path) -> None:
    (ct_dir / "corrupt.h5").write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(CTFileError, match=r"corrupt\.h5.*HDF5"):
        CTSliceDataset(ct_dir, _acq())
    ds = CTSliceDataset(ct_dir, _acq(), skip_bad_files=True)
    assert ds.skipped_files == [ct_dir / "corrupt.h5"] and len(ds) == 6
    (ct_dir / "corrupt.h5").unlink()

    with h5py.File(ct_dir / "nokey.h5", "w") as f:
        f["data"] = np.zeros((1, N, N), np.float32)
    with pytest.raises(CTFileError, match=r"nokey\.h5.*missing key 'image'"):
        CTSliceDataset(ct_dir / "nokey.h5", _acq())
    with h5py.File(ct_dir / "rank2.h5", "w") as f:
        f["image"] = np.zeros((N, N), np.float32)
        f.attrs["units"] = "HU"
    with pytest.raises(CTFileError, match=r"rank2\.h5.*rank 3 \(S, H, W\)"):
        CTSliceDataset([ct_dir / "rank2.h5"], _acq())
    with h5py.File(ct_dir / "nounits.h5", "w") as f:
        f["image"] = np.zeros((1, N, N), np.float32)
        f.attrs["pixel_spacing"] = [1.0, 1.0]
    with pytest.raises(CTFileError, match=r"nounits\.h5.*'units'"):
        CTSliceDataset(ct_dir / "nounits.h5", _acq())
    ds = CTSliceDataset(ct_dir, _acq(), skip_bad_files=True)
    assert {p.name for p in ds.skipped_files} == {"nokey.h5", "rank2.h5", "nounits.h5"}
    assert "rank 3" in ds.skip_reasons[ct_dir / "rank2.h5"]
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        CTSliceDataset([ct_dir / "missing.h5"], _acq())


# --- phantoms -------------------------------------------------------------------------
def test_random_ellipses_reproducible() -> None:
    a = random_ellipses(3, (N, N + 8), seed=5)
    assert a.shape == (3, N, N + 8) and a.dtype == torch.float32
    assert torch.equal(a, random_ellipses(3, (N, N + 8), seed=5))
    assert not torch.equal(a, random_ellipses(3, (N, N + 8), seed=6))
    assert float(a.min()) >= 0 and float(a.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    hu = random_ellipses(2, N, seed=5, values="HU", n_ellipses=(3, 3))
    assert float(hu[:, 0, 0].max()) == -1000.0  # air in the corners
    assert -1000.0 <= float(hu.min()) and float(hu.max()) <= 1200.0
    mu = random_ellipses(2, N, seed=5, values="attenuation_per_mm", n_ellipses=(3, 3))
    torch.testing.assert_close(mu, hu_to_attenuation(hu))


def test_phantom_volumes_feed_the_dataset(tmp_path: Path) -> None:
    paths = write_phantom_volumes(tmp_path, 2, 3, N, seed=1)
    assert [p.name for p in paths] == ["phantom_0000.h5", "phantom_0001.h5"]
    again = write_phantom_volumes(tmp_path / "again", 1, 3, N, seed=1)
    np.testing.assert_array_equal(read_ct_volume(again[0]).image, read_ct_volume(paths[0]).image)
    ds = CTSliceDataset(tmp_path, _fan(photons=1e5))
    assert len(ds) == 6 and torch.isfinite(ds[5].sinogram).all()
