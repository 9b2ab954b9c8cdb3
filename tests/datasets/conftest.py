"""Fixtures for the dataset tests: small fastMRI-layout files with known contents, and
fastMRI's own data modules as an optional reference."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fedrecon.datasets import write_fastmri_volume

N_SLICES, N_COILS, HEIGHT, WIDTH = 3, 4, 32, 24
RECON = (16, 16)
ACQUIRED = (2, 21)  # acquired columns [2, 21): zero padding of 2 left, 3 right


def np_ifft2c(k: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse FFT over the last two axes, in numpy (independent of torch)."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), axes=axes,
                                        norm="ortho"), axes=axes)


def np_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    top, left = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., top: top + size[0], left: left + size[1]]


def np_rss_target(kspace: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = np_ifft2c(kspace)
    mag = np.abs(image) if kspace.ndim == 3 else np.sqrt((np.abs(image) ** 2).sum(axis=1))
    return np_crop(mag, size).astype(np.float32)


def make_kspace(seed: int, multicoil: bool = True, acquired=ACQUIRED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (N_SLICES, N_COILS, HEIGHT, WIDTH) if multicoil else (N_SLICES, HEIGHT, WIDTH)
    k = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    k[..., : acquired[0]] = 0
    k[..., acquired[1]:] = 0
    return k


@dataclasses.dataclass
class Volume:
    path: Path
    kspace: np.ndarray
    target: np.ndarray | None
    mask: np.ndarray | None = None


@dataclasses.dataclass
class FastMRIFiles:
    multicoil: Path  # folder: 2 multicoil train volumes
    singlecoil: Path  # folder: 1 singlecoil train volume
    test: Path  # folder: 1 multicoil test volume (mask, undersampled k-space)
    volumes: dict[str, Volume]


def write_train_volume(folder: Path, name: str, seed: int, multicoil: bool = True,
                       **kwargs) -> Volume:
    k = make_kspace(seed, multicoil)
    target = np_rss_target(k, RECON)
    key = "reconstruction_rss" if multicoil else "reconstruction_esc"
    path = write_fastmri_volume(folder / name, k, recon_size=RECON, **{key: target}, **kwargs)
    return Volume(path, k, target)


@pytest.fixture(scope="session")
def fastmri_files(tmp_path_factory: pytest.TempPathFactory) -> FastMRIFiles:
    base = tmp_path_factory.mktemp("fastmri")
    vols = {}
    mc, sc, test = base / "multicoil", base / "singlecoil", base / "test"
    vols["file1000001.h5"] = write_train_volume(mc, "file1000001.h5", 1, patient_id="p1")
    vols["file1000002.h5"] = write_train_volume(mc, "file1000002.h5", 2,
                                                acquisition="CORPDFS_FBK")
    vols["file1000003.h5"] = write_train_volume(sc, "file1000003.h5", 3, multicoil=False)
    k = make_kspace(4)
    mask = np.zeros(WIDTH, dtype=np.float32)
    mask[9:15] = 1  # ACS of 6 columns around W // 2 = 12
    mask[[3, 6, 17, 20]] = 1
    k_under = (k * mask).astype(np.complex64)
    path = write_fastmri_volume(test / "file1000004.h5", k_under, mask=mask, recon_size=RECON,
                                attrs={"acceleration": 4, "num_low_frequency": 6},
                                acquired_columns=ACQUIRED)
    vols["file1000004.h5"] = Volume(path, k_under, None, mask)
    return FastMRIFiles(mc, sc, test, vols)


# -- fastMRI's own modules (reference only) ------------------------------------------------
def _import_fastmri_data() -> types.SimpleNamespace | None:
    """``fastmri.data.{mri_data, transforms, subsample}``, or ``None`` without fastmri.

    ``mri_data.py`` imports pandas, requests and yaml at the top but uses them only in
    ``AnnotatedSliceDataset``/``fetch_dir``; fastmri is installed with --no-deps, so the
    missing ones are stubbed while importing (and removed from ``sys.modules`` afterwards).
    """
    if importlib.util.find_spec("fastmri") is None:
        return None
    stubs = [n for n in ("pandas", "requests", "yaml", "tqdm")
             if importlib.util.find_spec(n) is None]
    for name in stubs:
        stub = types.ModuleType(name)
        stub.__getattr__ = lambda attr: object  # type: ignore[attr-defined] # pd.Series in hints
        sys.modules[name] = stub
    try:
        mri_data = importlib.import_module("fastmri.data.mri_data")
        transforms = importlib.import_module("fastmri.data.transforms")
        subsample = importlib.import_module("fastmri.data.subsample")
    except Exception:  # noqa: BLE001 - any failure means: no reference available
        return None
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return types.SimpleNamespace(mri_data=mri_data, transforms=transforms, subsample=subsample)


FASTMRI = _import_fastmri_data()


@pytest.fixture(scope="session")
def fastmri_ref() -> types.SimpleNamespace:
    if FASTMRI is None:
        pytest.skip("fastmri (reference) is not importable")
    return FASTMRI


@pytest.fixture(scope="session")
def helpers() -> types.SimpleNamespace:
    """The numpy reference helpers and sizes above (test modules cannot import conftest)."""
    return types.SimpleNamespace(
        np_ifft2c=np_ifft2c, np_crop=np_crop, np_rss_target=np_rss_target,
        make_kspace=make_kspace, write_train_volume=write_train_volume,
        N_SLICES=N_SLICES, N_COILS=N_COILS, HEIGHT=HEIGHT, WIDTH=WIDTH, RECON=RECON,
        ACQUIRED=ACQUIRED)
