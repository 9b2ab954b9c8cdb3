"""MRI transforms (mask, crop, zero-filled, normalisation) and the ESPIRiT coil-map cache."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch
from fedrecon.datasets import (
    CoilMapCache,
    EspiritSettings,
    FastMRISliceDataset,
    acs_width,
    apply_mask,
    center_crop,
    mri_transforms,
    normalize_instance,
    rss_target,
    zero_filled,
)
from fedrecon.operators import RandomMask, birdcage_maps, espirit_maps, fft2c

SMALL_ESPIRIT = EspiritSettings(calib_width=8, kernel_width=3, max_iter=20)


# -- pure transforms -----------------------------------------------------------------------
@pytest.mark.parametrize("shape, size, rows, cols", [
    ((6, 8), (4, 4), (1, 5), (2, 6)),
    ((7, 9), (4, 4), (1, 5), (2, 6)),   # odd difference: the extra row/col is dropped last
    ((7, 9), (3, 5), (2, 5), (2, 7)),
    ((5, 5), (5, 5), (0, 5), (0, 5)),
])
def test_center_crop_indices(shape, size, rows, cols):
    x = torch.arange(int(np.prod(shape))).reshape(shape)
    out = center_crop(x, size)
    assert torch.equal(out, x[rows[0]: rows[1], cols[0]: cols[1]])
    np.testing.assert_array_equal(center_crop(x.numpy(), size), out.numpy())
    xc = torch.complex(x.float(), -x.float())[None]
    assert torch.equal(center_crop(xc, size)[0].real, out.float())


def test_center_crop_matches_fastmri_and_rejects_too_large(fastmri_ref):
    x = torch.randn(3, 11, 14)
    for size in [(4, 4), (5, 7), (11, 14), (6, 13)]:
        assert torch.equal(center_crop(x, size), fastmri_ref.transforms.center_crop(x, size))
    with pytest.raises(ValueError, match="'size'"):
        center_crop(x, (12, 4))


def test_apply_mask_padding_and_fastmri(fastmri_ref):
    k = torch.randn(4, 16, 20, dtype=torch.complex64)
    seed = tuple(map(ord, "file1.h5"))
    masked, mask, n_low = apply_mask(k, RandomMask([0.2], [3]), seed=seed, padding=(3, 17))
    ref = RandomMask([0.2], [3])((4, 16, 20), seed=seed).mask.clone()
    ref[..., :3] = 0
    ref[..., 17:] = 0
    assert torch.equal(mask, ref) and mask.shape == (1, 1, 20)
    assert torch.equal(masked, k * ref)
    r_masked, r_mask, r_low = fastmri_ref.transforms.apply_mask(
        torch.view_as_real(k), fastmri_ref.subsample.RandomMaskFunc([0.2], [3]), seed=seed,
        padding=(3, 17))
    np.testing.assert_array_equal(mask.reshape(-1).numpy(), r_mask.reshape(-1).numpy())
    np.testing.assert_array_equal(masked.numpy(), torch.view_as_complex(r_masked).numpy())
    assert n_low == r_low


def test_zero_filled_and_rss_target(helpers):
    k = helpers.make_kspace(5)[0]  # (C, H, W)
    img = helpers.np_ifft2c(k)
    expected = np.sqrt((np.abs(img) ** 2).sum(axis=0))
    np.testing.assert_allclose(zero_filled(torch.from_numpy(k)).numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(zero_filled(torch.from_numpy(k[0])).numpy(), np.abs(img[0]),
                               rtol=1e-5, atol=1e-6)
    t = rss_target(k, (16, 16))
    assert t.dtype == torch.float32 and t.shape == (16, 16)
    np.testing.assert_allclose(t.numpy(), helpers.np_crop(expected, (16, 16)), rtol=1e-5,
                               atol=1e-6)


def test_normalize_instance():
    x = torch.randn(8, 9) * 3 + 2
    y, mean, std = normalize_instance(x)
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-5
    torch.testing.assert_close(y * (std + 1e-11) + mean, x)


def test_acs_width():
    m = np.zeros(24)
    m[9:15] = 1
    m[[2, 20]] = 1
    assert acs_width(m) == 6 and acs_width(torch.from_numpy(m).reshape(1, 1, 24)) == 6
    m[12] = 0
    assert acs_width(m) == 0


# -- coil-map cache --------------------------------------------------------------------------
@pytest.fixture
def espirit_calls(monkeypatch):
    """Count the ESPIRiT runs of the cache (the real estimator still runs)."""
    calls = []

    def counting(kspace, **kwargs):
        calls.append((tuple(kspace.shape), kwargs))
        return espirit_maps(kspace, **kwargs)

    monkeypatch.setattr(mri_transforms, "espirit_maps", counting)
    return calls


def _smooth_volume(path, n_slices=2, n_coils=4, shape=(32, 24)):
    """A volume whose coil images are an object times birdcage maps (ESPIRiT recovers them)."""
    from fedrecon.datasets import write_fastmri_volume

    maps = birdcage_maps(n_coils, shape)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]),
                            indexing="ij")
    obj = ((yy ** 2 + xx ** 2) < 0.6).to(torch.complex64)
    k = torch.stack([fft2c(maps * obj * (1 + 0.1 * s)) for s in range(n_slices)]).numpy()
    return write_fastmri_volume(path, k, recon_size=(16, 16),
                                reconstruction_rss=rss_target(k, (16, 16)).numpy())


def test_coil_map_cache_computes_once_per_volume(tmp_path, espirit_calls):
    path = _smooth_volume(tmp_path / "data" / "vol.h5")
    mask = torch.ones(1, 1, 24)
    cache = CoilMapCache(tmp_path / "cache", SMALL_ESPIRIT)
    m0 = cache.get(path, 0, mask, 24)
    assert len(espirit_calls) == 1 and espirit_calls[0][0] == (2, 4, 32, 24)  # whole volume
    m1 = cache.get(path, 1, mask, 24)
    assert m0.shape == m1.shape == (4, 32, 24) and m0.dtype == torch.complex64
    # a new cache object (a later epoch, another worker) reads the sidecar: no ESPIRiT
    again = CoilMapCache(tmp_path / "cache", SMALL_ESPIRIT)
    assert torch.equal(again.get(path, 1, mask, 24), m1)
    assert len(espirit_calls) == 1
    sidecars = list((tmp_path / "cache").iterdir())
    assert len(sidecars) == 1 and sidecars[0].name.startswith("vol-")
    assert sidecars[0].name.endswith(".maps.h5")
    # the maps equal a direct ESPIRiT run with the same settings
    with h5py.File(path, "r") as hf:
        k = torch.from_numpy(hf["kspace"][()])
    direct = espirit_maps(k, calib_width=8, kernel_width=3, max_iter=20)
    torch.testing.assert_close(m1, direct[1])


def test_coil_map_cache_key_covers_settings_mask_and_content(tmp_path, espirit_calls):
    path = _smooth_volume(tmp_path / "vol.h5")
    full = torch.ones(1, 1, 24)
    cache = CoilMapCache(tmp_path / "cache", SMALL_ESPIRIT)
    key = cache.key(path, full, 24)
    other = CoilMapCache(tmp_path / "cache", EspiritSettings(calib_width=8, kernel_width=3,
                                                              max_iter=20, thresh=0.05))
    assert other.key(path, full, 24) != key
    under = RandomMask([0.4], [2])((4, 32, 24), seed=1).mask
    assert cache.key(path, under, 10) != key
    cache.get(path, 0, full, 24)
    n = len(espirit_calls)
    # same size and (restored) mtime but other content: the content digest catches it
    st = os.stat(path)
    with h5py.File(path, "a") as hf:
        hf["kspace"][-1] = 2 * hf["kspace"][-1]
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    assert CoilMapCache(tmp_path / "cache", SMALL_ESPIRIT).key(path, full, 24) != key
    CoilMapCache(tmp_path / "cache", SMALL_ESPIRIT).get(path, 0, full, 24)
    assert len(espirit_calls) == n + 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"]


def test_coil_map_cache_recovers_from_bad_sidecar(tmp_path, espirit_calls):
    path = _smooth_volume(tmp_path / "vol.h5")
    full = torch.ones(1, 1, 24)
    cache = CoilMapCache(tmp_path / "cache", SMALL_ESPIRIT)
    good = cache.get(path, 0, full, 24)
    sidecar = cache.sidecar_path(path, cache.key(path, full, 24))
    sidecar.write_bytes(b"garbage")
    torch.testing.assert_close(cache.get(path, 0, full, 24), good)
    assert len(espirit_calls) == 2


def test_coil_map_cache_rejects_narrow_acs(tmp_path):
    path = _smooth_volume(tmp_path / "vol.h5")
    cache = CoilMapCache(tmp_path / "cache", SMALL_ESPIRIT)
    with pytest.raises(ValueError, match="too narrow for\nESPIRiT|too narrow for ESPIRiT"):
        cache.get(path, 0, torch.ones(1, 1, 24), 3)


def test_dataset_with_cached_coil_maps(tmp_path, espirit_calls):
    root = tmp_path / "site"
    _smooth_volume(root / "file1.h5")
    _smooth_volume(root / "file2.h5")
    mask = RandomMask([0.4], [2])
    ds = FastMRISliceDataset(root, "multicoil", mask=mask,
                             coil_maps=CoilMapCache(root / ".fedrecon-cache", SMALL_ESPIRIT))
    samples = [ds[i] for i in range(len(ds))]
    assert len(espirit_calls) == 2  # one per volume, not per slice
    for s in samples:
        assert s.coil_maps.shape == (4, 32, 24) and s.coil_maps.dtype == torch.complex64
        # maps from the masked ACS, with unit RSS inside the object support
        assert float(s.coil_maps.abs().square().sum(0).max()) == pytest.approx(1.0, abs=1e-3)
    # the default cache folder is <root>/.fedrecon-cache and is not taken for data
    ds2 = FastMRISliceDataset(root, "multicoil", mask=mask, coil_maps="espirit")
    assert ds2.coil_map_cache.cache_dir == root / ".fedrecon-cache"
    assert len(ds2.volumes) == 2
    with pytest.raises(ValueError, match="needs the multicoil"):
        FastMRISliceDataset(root, "singlecoil", coil_maps="espirit")
    # a later epoch with a fresh dataset: all cache hits
    ds3 = FastMRISliceDataset(root, "multicoil", mask=mask,
                              coil_maps=CoilMapCache(root / ".fedrecon-cache", SMALL_ESPIRIT))
    for i in range(len(ds3)):
        assert torch.equal(ds3[i].coil_maps, samples[i].coil_maps)
    assert len(espirit_calls) == 2
