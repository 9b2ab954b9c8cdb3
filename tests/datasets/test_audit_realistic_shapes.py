"""fastMRI files shaped like the real data, written with plain h5py (not fedrecon's writer),
through the command line: readout oversampled 2x (k-space ``(S, C, 2h, W)`` with zero-padded
columns and a ``(S, h, h)`` RSS target), coil counts and matrix widths that change from file
to file within one site, and the files a user gets wrong (one-line errors naming the file and
the key). Tiny sizes: k-space ``(2, C, 64, 46..48)``, target 32x32."""

from __future__ import annotations

import csv
from pathlib import Path
from xml.etree import ElementTree

import h5py
import numpy as np
import pytest

from fedrecon.cli import main

NS = "http://www.ismrm.org/ISMRMRD"
H, CROP = 64, 32


def _header(width: int, left: int, right: int, n_slices: int) -> str:
    # like the fastMRI files: padding_left = y // 2 - center, padding_right = left + maximum + 1
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="{NS}">'
            f"<encoding><encodedSpace><matrixSize><x>{H}</x><y>{width}</y><z>1</z></matrixSize>"
            f"<fieldOfView_mm><x>280</x><y>161</y><z>4.5</z></fieldOfView_mm></encodedSpace>"
            f"<reconSpace><matrixSize><x>{CROP}</x><y>{CROP}</y><z>1</z></matrixSize>"
            f"<fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm></reconSpace>"
            f"<trajectory>cartesian</trajectory><encodingLimits><kspace_encoding_step_1>"
            f"<minimum>0</minimum><maximum>{right - left - 1}</maximum>"
            f"<center>{width // 2 - left}</center></kspace_encoding_step_1>"
            f"<slice><minimum>0</minimum><maximum>{n_slices - 1}</maximum><center>0</center>"
            f"</slice></encodingLimits></encoding></ismrmrdHeader>")


def _fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1))


def _ifft2c(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1))


def _crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top: top + h, left: left + w]


def _write(path: Path, coils: int, width: int, pad: tuple[int, int], seed: int, *,
           header: bool = True, real: bool = False, target: bool = True,
           mask: np.ndarray | None = None) -> Path:
    """A smooth phantom times smooth coil sensitivities; zero columns outside ``pad``."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, width), indexing="ij")
    ks = []
    for _ in range(2):
        img = np.exp(-2 * ((y / 0.45) ** 2 + (x / 0.7) ** 2))
        cy, cx = rng.uniform(-0.2, 0.2, 2)
        img = img + 0.5 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.02)
        img = img * np.exp(0.4j * x)
        maps = np.stack([np.exp(-((y - np.sin(a)) ** 2 + (x - np.cos(a)) ** 2) / 0.8 + 1j * a)
                         for a in 2 * np.pi * np.arange(coils) / coils])
        k = _fft2c(maps * img)
        k[..., :pad[0]] = 0
        k[..., pad[1]:] = 0
        ks.append(k)
    kspace = (np.stack(ks) * 1e-4).astype(np.complex64)
    rss = _crop(np.sqrt((np.abs(_ifft2c(kspace.astype(np.complex128))) ** 2).sum(1)), CROP, CROP)
    with h5py.File(path, "w") as hf:
        hf["kspace"] = kspace.real.copy() if real else kspace
        if target:
            hf["reconstruction_rss"] = rss.astype(np.float32)
        if mask is not None:
            hf["mask"] = mask
        if header:  # a variable-length string, as h5py writes a Python str
            hf.create_dataset("ismrmrd_header", data=_header(width, *pad, 2),
                              dtype=h5py.string_dtype("utf-8"))
        hf.attrs["acquisition"] = "CORPD_FBK"
        hf.attrs["max"] = float(rss.max())
        hf.attrs["norm"] = float(np.linalg.norm(rss))
        hf.attrs["patient_id"] = f"p{seed}"
    return path


# coils, width, acquired columns: one site mixes them from file to file (real fastMRI does)
MIXED = [(4, 46, (3, 43)), (6, 46, (3, 43)), (4, 48, (4, 44))]


def _site(root: Path) -> Path:
    seed = 0
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        for coils, width, pad in MIXED:
            seed += 1
            _write(root / split / f"file{1000 + seed}.h5", coils, width, pad, seed)
    return root


def _config(tmp: Path, folder: Path, batch_size: int = 1) -> Path:
    path = tmp / "run.toml"
    path.write_text(f"""seed = 0
rounds = 1
local_steps = 1
batch_size = {batch_size}
[strategy]
name = "partial"
[model]
n_iter = 1
chans = 2
num_pools = 1
[[sites]]
name = "knee"
modality = "mri"
train = "{folder / 'train'}"
val = "{folder / 'val'}"
test = "{folder / 'test'}"
[sites.acquisition]
mask = "random"
acceleration = 4
center_fraction = 0.16
""")
    return path


def _fastmri_random_mask(fname: str, n_cols: int, center_fraction: float,
                         acceleration: float) -> np.ndarray:
    """fastMRI's RandomMaskFunc, seeded per volume by ``tuple(map(ord, fname))``."""
    rng = np.random.RandomState()
    rng.seed(tuple(map(ord, fname)))
    rng.randint(1)  # choose_acceleration with one (fraction, acceleration) pair
    n_low = round(n_cols * center_fraction)
    center = np.zeros(n_cols, np.float32)
    start = (n_cols - n_low + 1) // 2
    center[start: start + n_low] = 1
    prob = (n_cols / acceleration - n_low) / (n_cols - n_low)
    return np.maximum(center, rng.uniform(size=n_cols) < prob).astype(np.float32)


def _ssim_slice(a: np.ndarray, b: np.ndarray, data_range: float, win: int = 7) -> float:
    """scikit-image's SSIM as fastMRI calls it: 7x7 uniform window, K1 0.01, K2 0.03, sample
    covariance, half a window of border left out."""
    n = win * win
    views = np.lib.stride_tricks.sliding_window_view

    def mean(x):
        return views(x, (win, win)).mean(axis=(-2, -1))
    ma, mb = mean(a), mean(b)
    va = n / (n - 1) * (mean(a * a) - ma * ma)
    vb = n / (n - 1) * (mean(b * b) - mb * mb)
    cov = n / (n - 1) * (mean(a * b) - ma * mb)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * ma * mb + c1) * (2 * cov + c2))
                  / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())


def _zero_filled_reference(path: Path) -> tuple[np.ndarray, float, float]:
    with h5py.File(path, "r") as hf:
        kspace = hf["kspace"][()].astype(np.complex128)
        target = hf["reconstruction_rss"][()].astype(np.float64)
        root = ElementTree.fromstring(hf["ismrmrd_header"][()])
    width = kspace.shape[-1]

    def field(tag: str) -> int:
        return int(root.find(f".//{{{NS}}}kspace_encoding_step_1/{{{NS}}}{tag}").text)
    left = width // 2 - field("center")  # fastMRI's padding_left / padding_right
    right = left + field("maximum") + 1
    mask = _fastmri_random_mask(path.name, width, 0.16, 4)
    mask[:left] = 0
    mask[right:] = 0
    recon = _crop(np.sqrt((np.abs(_ifft2c(kspace * mask)) ** 2).sum(1)), CROP, CROP)
    maxval = target.max()
    psnr = 10 * np.log10(maxval ** 2 / np.mean((recon - target) ** 2))
    ssim = np.mean([_ssim_slice(recon[s], target[s], maxval) for s in range(len(target))])
    return recon, float(psnr), float(ssim)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(["--quiet", *argv])
    return rc, capsys.readouterr().err


def test_site_mixing_coil_counts_and_widths_trains_and_evaluates(tmp_path, capsys):
    """Evaluation batches (8 slices) used to stack slices of 4- and 6-coil volumes and crash
    in collate_mri_samples even with batch_size = 1; the zero-filled baseline's volume
    metrics and fastMRI-layout reconstructions match a numpy reference."""
    folder = _site(tmp_path / "data")
    cfg = _config(tmp_path, folder)
    rc, err = _run(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    out = tmp_path / "eval"
    rc, err = _run(["evaluate", "--run", str(tmp_path / "run"), "--out", str(out),
                    "--baselines", "zero_filled"], capsys)
    assert rc == 0, err
    assert (out / "report.md").is_file() and (out / "metrics.csv").is_file()
    with open(out / "metrics_volumes.csv") as f:
        rows = {(r["method"], r["volume"]): r for r in csv.DictReader(f)}
    for path in sorted((folder / "test").glob("*.h5")):
        recon, psnr, ssim = _zero_filled_reference(path)
        row = rows["zero_filled", path.name]
        assert float(row["psnr"]) == pytest.approx(psnr, abs=1e-3)
        assert float(row["ssim"]) == pytest.approx(ssim, abs=1e-5)
        for method in ("zero_filled", "partial"):
            with h5py.File(out / "reconstructions" / method / "knee" / path.name, "r") as hf:
                assert hf["reconstruction"].shape == (2, CROP, CROP)
                if method == "zero_filled":
                    np.testing.assert_allclose(hf["reconstruction"][()], recon,
                                               rtol=1e-4, atol=1e-6 * recon.max())


def test_mixed_shapes_with_batch_size_above_one_is_a_config_error(tmp_path, capsys):
    folder = _site(tmp_path / "data")
    cfg = _config(tmp_path, folder, batch_size=2)
    rc, err = _run(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "batch_size" in err and "'knee'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, key", [
    ({"header": False}, "'ismrmrd_header'"),
    ({"real": True}, "'kspace' must be a complex64"),
    ({"target": False, "mask": np.ones(46, np.float32)}, "'reconstruction_rss'"),
])
def test_bad_file_in_train_split_is_a_one_line_error(tmp_path, capsys, bad, key):
    """A file without header or with real k-space used to end in a traceback (exit 1); a
    test/challenge file (mask, no target) in the train split crashed mid-training without
    naming the file and left a run folder behind."""
    folder = _site(tmp_path / "data")
    bad_file = _write(folder / "train" / "file9999.h5", 4, 46, (3, 43), 99, **bad)
    cfg = _config(tmp_path, folder)
    rc, err = _run(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert str(bad_file) in err and key in err
    assert not (tmp_path / "run").exists()


def test_folder_without_h5_files_is_a_one_line_error(tmp_path, capsys):
    folder = _site(tmp_path / "data")
    for f in (folder / "val").glob("*.h5"):
        f.unlink()
    (folder / "val" / "notes.txt").write_text("no volumes here")
    rc, err = _run(["train", "--config", str(_config(tmp_path, folder)), "--out",
                    str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert str(folder / "val") in err and ".h5" in err
