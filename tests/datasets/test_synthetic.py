"""Synthetic fastMRI data: real files read back by the real loader, targets, seeds, noise,
and the anatomy source."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedrecon.datasets import FastMRISliceDataset, load_brain_slices, make_synthetic_fastmri
from fedrecon.datasets import anatomy as anatomy_mod
from fedrecon.datasets.anatomy import mni152_template_path, resolve_anatomy_source

# without the MNI152 template the data come from phantoms, with a warning
pytestmark = pytest.mark.filterwarnings("ignore:anatomy:RuntimeWarning")
HAS_MNI152 = mni152_template_path() is not None and importlib.util.find_spec("nibabel") is not None
SIZE, COILS, SLICES = 40, 3, 3


def np_ifft2c(k: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse FFT in numpy (independent of the torch operators)."""
    ax = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=ax), axes=ax, norm="ortho"),
                           axes=ax)


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {key: f[key][()] for key in f if key != "ismrmrd_header"}
        out["attrs"] = dict(f.attrs)
    return out


def generate(out: Path, seed: int = 0, **kw) -> list[Path]:
    args = {"n_volumes": 2, "n_coils": COILS, "image_size": SIZE, "n_slices": SLICES,
            "seed": seed}
    return make_synthetic_fastmri(out, **{**args, **kw})


def test_files_are_read_back_by_the_fastmri_loader(tmp_path):
    paths = generate(tmp_path, noise_std=0.01, acquisition="AXT2")
    assert [p.name for p in paths] == ["synth_AXT2_s0_000.h5", "synth_AXT2_s0_001.h5"]
    ds = FastMRISliceDataset(paths)
    assert len(ds) == 2 * SLICES
    sample = ds[SLICES + 1]
    assert sample.kspace.shape == (COILS, SIZE, SIZE)
    assert sample.target.shape == (SIZE, SIZE) and sample.crop_size == (SIZE, SIZE)
    assert sample.acquisition == "AXT2" and sample.fname == paths[1].name
    stored = read(paths[1])
    np.testing.assert_array_equal(sample.target.numpy(), stored["reconstruction_rss"][1])
    assert sample.max_value == pytest.approx(float(stored["reconstruction_rss"].max()))
    assert stored["attrs"]["contrast"] == "t2" and stored["attrs"]["n_coils"] == COILS


def test_stored_rss_equals_independent_rss_of_coil_images(tmp_path):
    # noise-free: the coil images are exactly ifft2c(kspace)
    path = generate(tmp_path, noise_std=0.0, coil_shading=True)[0]
    stored = read(path)
    assert stored["kspace"].dtype == np.complex64
    rss = np.sqrt((np.abs(np_ifft2c(stored["kspace"].astype(np.complex128))) ** 2).sum(axis=1))
    np.testing.assert_allclose(stored["reconstruction_rss"], rss, atol=1e-5 * rss.max())
    assert stored["attrs"]["max"] == pytest.approx(rss.max(), rel=1e-5)


def test_normalised_coils_give_the_anatomy_as_target(tmp_path):
    stored = read(generate(tmp_path, noise_std=0.0)[0])
    images = np_ifft2c(stored["kspace"].astype(np.complex128))
    assert float(np.ptp(np.angle(images[0, 0])[stored["reconstruction_rss"][0] > 0.3])) > 0.5, \
        "the images should carry a spatially varying phase"
    target = stored["reconstruction_rss"]
    assert 0 <= target.min() and target.max() <= 1.0 + 1e-5


def test_same_seed_is_bitwise_reproducible_and_other_seeds_differ(tmp_path):
    a = [read(p) for p in generate(tmp_path / "a", seed=3)]
    b = [read(p) for p in generate(tmp_path / "b", seed=3)]
    c = [read(p) for p in generate(tmp_path / "c", seed=4)]
    for x, y in zip(a, b):
        assert x["kspace"].tobytes() == y["kspace"].tobytes()
        assert x["reconstruction_rss"].tobytes() == y["reconstruction_rss"].tobytes()
    assert not np.array_equal(a[0]["kspace"], c[0]["kspace"])
    # the volumes of one call differ too (slab, pose, coil rotation)
    assert not np.allclose(a[0]["reconstruction_rss"], a[1]["reconstruction_rss"], atol=0.05)


def test_noise_level_in_kspace_corners(tmp_path):
    std = 0.05
    noisy = read(generate(tmp_path / "n", noise_std=std, image_size=64)[0])["kspace"]
    clean = read(generate(tmp_path / "c", noise_std=0.0, image_size=64)[0])["kspace"]

    def corner_power(k: np.ndarray) -> float:
        ends = (slice(0, 10), slice(-10, None))
        return float(np.mean([np.mean(np.abs(k[..., sy, sx]) ** 2) for sy in ends for sx in ends]))

    # signal and noise are independent: their powers add up in the corners
    assert np.sqrt(corner_power(noisy) - corner_power(clean)) == pytest.approx(std, rel=0.08)
    # the noise is the only difference between the two runs (its own seed stream)
    diff = noisy.astype(np.complex128) - clean
    assert np.sqrt(np.mean(np.abs(diff) ** 2)) == pytest.approx(std, rel=0.02)
    assert np.std(diff.real) == pytest.approx(std / np.sqrt(2), rel=0.03)


def test_singlecoil_files(tmp_path):
    path = generate(tmp_path, noise_std=0.0, challenge="singlecoil")[0]
    stored = read(path)
    assert stored["kspace"].shape == (SLICES, SIZE, SIZE)
    np.testing.assert_allclose(stored["reconstruction_esc"], np.abs(np_ifft2c(stored["kspace"])),
                               atol=1e-5)
    sample = FastMRISliceDataset([path], challenge="singlecoil")[0]
    assert sample.kspace.shape == (1, SIZE, SIZE)


def test_anatomy_source_is_reported_in_slices_and_files(tmp_path):
    expected = "mni152" if HAS_MNI152 else "phantom"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slices = load_brain_slices(4, 32, seed=0)
        attrs = read(generate(tmp_path, n_volumes=1)[0])["attrs"]
    assert slices.source == expected and attrs["anatomy"] == expected
    assert slices.images.shape == (4, 32, 32) and slices.images.dtype == np.float32
    assert 0.0 <= slices.images.min() and slices.images.max() <= 1.0
    phantom = load_brain_slices(2, 32, source="phantom", seed=0)
    assert phantom.source == "phantom" and phantom.images.max() > 0.5


def test_fallback_to_phantoms_warns_when_the_template_is_missing(monkeypatch):
    monkeypatch.setattr(anatomy_mod, "mni152_template_path", lambda: None)
    with pytest.warns(RuntimeWarning, match="falling back to analytic Shepp-Logan"):
        slices = load_brain_slices(2, 32, source="auto", seed=0)
    assert slices.source == "phantom"
    with pytest.raises(RuntimeError, match="nilearn"):
        resolve_anatomy_source("mni152")


@pytest.mark.skipif(not HAS_MNI152, reason="MNI152 template (nilearn wheel) or nibabel absent")
def test_mni152_slices_look_like_a_brain():
    t1 = load_brain_slices(3, 64, source="mni152", seed=1, contrast="t1", augment=False).images
    t2 = load_brain_slices(3, 64, source="mni152", seed=1, contrast="t2", augment=False).images
    brain = t1 > 0.05
    assert 0.15 < brain.mean() < 0.7  # a head in the middle of the field of view
    assert not brain[:, :3].any() and not brain[:, :, :3].any()  # dark border
    tissue = t1 > 0.45  # away from the partial-volume rim
    assert np.corrcoef(t1[tissue], t2[tissue])[0, 1] < -0.8  # T2: contrast inverted
    flipped = load_brain_slices(3, 64, source="mni152", seed=1, augment=False, z_range=(0.6, 1))
    assert not np.allclose(flipped.images, t1)  # another slab
