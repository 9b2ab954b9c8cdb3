"""Volume metrics against fastMRI's own ``evaluate.py`` functions on the cases the basic
tests leave out: odd sizes, single slices, structured images, complex inputs, constant and
empty volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrecon.evaluation import volume_metrics
from fedrecon.metrics import nmse, psnr, ssim


def _fastmri_metric_functions() -> dict:
    """``nmse``, ``psnr``, ``ssim`` as defined in the installed ``fastmri/evaluate.py``
    (the module itself imports pandas via fastmri.data, so only these are executed)."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fastmri")
    if spec is None or spec.origin is None:
        pytest.skip("fastmri (test-only reference) is not installed")
    tree = ast.parse((Path(spec.origin).parent / "evaluate.py").read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name in ("nmse", "psnr", "ssim")]
    skm = pytest.importorskip("skimage.metrics")
    ns = {"np": np, "Optional": __import__("typing").Optional,
          "peak_signal_noise_ratio": skm.peak_signal_noise_ratio,
          "structural_similarity": skm.structural_similarity}
    exec(compile(ast.Module(body=body, type_ignores=[]), "fastmri/evaluate.py", "exec"), ns)  # noqa: S102
    return ns


def _phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Ellipses on a dark background with some noise: an MR-like magnitude volume."""
    s, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    vol = np.zeros(shape)
    for k in range(s):
        for _ in range(3):
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
            vol[k][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] += rng.uniform(0.2, 1.0)
    return vol * 1e-4  # fastMRI's k-space scale


@pytest.mark.parametrize("shape", [(1, 7, 7), (1, 9, 31), (2, 8, 100), (4, 23, 13)])
def test_structured_and_odd_volumes_equal_fastmri(shape) -> None:
    ref = _fastmri_metric_functions()
    gt = _phantom(shape, 1)
    pred = gt + 1e-5 * np.random.default_rng(2).standard_normal(shape)
    ours = volume_metrics(pred, gt)
    assert ours["psnr"] == pytest.approx(float(ref["psnr"](gt, pred)), abs=1e-8)
    assert ours["ssim"] == pytest.approx(float(ref["ssim"](gt, pred)[0]), abs=1e-8)
    assert ours["nmse"] == pytest.approx(float(ref["nmse"](gt, pred)), rel=1e-9)


def test_complex_volumes_are_scored_by_magnitude() -> None:
    """A complex reconstruction is its magnitude image (fastMRI scores magnitudes), not its
    real part."""
    ref = _fastmri_metric_functions()
    rng = np.random.default_rng(3)
    gt = _phantom((2, 16, 20), 4)
    phase = np.exp(1j * rng.uniform(0, 2 * np.pi, gt.shape))
    pred = (gt + 1e-5 * rng.standard_normal(gt.shape)) * phase
    mag = np.abs(pred)
    for recon in (pred, torch.from_numpy(pred), torch.from_numpy(pred.astype(np.complex64))):
        ours = volume_metrics(recon, gt)
        tol = 1e-8 if not (isinstance(recon, torch.Tensor)
                           and recon.dtype == torch.complex64) else 1e-4
        assert ours["psnr"] == pytest.approx(float(ref["psnr"](gt, mag)), abs=tol * 1e3)
        assert ours["ssim"] == pytest.approx(float(ref["ssim"](gt, mag)[0]), abs=tol)
        assert ours["nmse"] == pytest.approx(float(ref["nmse"](gt, mag)), rel=tol * 10)


def test_constant_volumes() -> None:
    """A constant positive target is fine (hand values); an all-zero target has no data
    range, which is an error naming it, never a silent -inf / nan."""
    one = np.ones((2, 9, 9))
    half = volume_metrics(0.5 * one, one)
    # MSE 0.25, range 1: 10 log10(4); NMSE 0.25; SSIM of constants: (2ab + c1)/(a^2 + b^2 + c1)
    c1 = 0.01**2
    assert half["psnr"] == pytest.approx(10 * np.log10(4.0))
    assert half["nmse"] == pytest.approx(0.25)
    assert half["ssim"] == pytest.approx((2 * 0.5 + c1) / (1.25 + c1))
    same = volume_metrics(one, one)
    assert same["ssim"] == 1.0 and same["nmse"] == 0.0 and np.isfinite(same["psnr"])
    with pytest.raises(ValueError, match="data range"):
        volume_metrics(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="maxval"):
        volume_metrics(one, one, maxval=0.0)


def test_torch_metrics_refuse_complex_images() -> None:
    x = torch.rand(2, 12, 12, dtype=torch.complex64)
    for fn in (psnr, ssim, nmse):
        with pytest.raises(ValueError, match="magnitude"):
            fn(x, x.abs())
