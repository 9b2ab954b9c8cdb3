"""Volume metrics equal fastMRI's own evaluation functions (read from the installed
``fastmri`` package, a test-only reference), and the baselines' parameter tuning."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrecon.evaluation import VolumeResult, hu_window_metrics, summarize, volume_metrics


def _fastmri_metric_functions() -> dict:
    """fastMRI's ``nmse``, ``psnr`` and ``ssim`` from ``fastmri/evaluate.py``; that module's
    other imports (pandas, runstats via fastmri.data) are not needed for these functions,
    so only their definitions are executed."""
    spec = importlib.util.find_spec("fastmri")
    if spec is None or spec.origin is None:
        pytest.skip("fastmri (test-only reference) is not installed")
    source = (Path(spec.origin).parent / "evaluate.py").read_text()
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name in ("mse", "nmse", "psnr", "ssim")]
    assert len(keep) == 4
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ns = {"np": np, "Optional": __import__("typing").Optional,
          "peak_signal_noise_ratio": peak_signal_noise_ratio,
          "structural_similarity": structural_similarity}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "fastmri/evaluate.py", "exec"), ns)  # noqa: S102
    return ns


@pytest.mark.parametrize("shape", [(3, 40, 40), (5, 33, 47)])
def test_volume_metrics_equal_fastmri(shape) -> None:
    ref = _fastmri_metric_functions()
    rng = np.random.default_rng(0)
    gt = rng.random(shape) ** 2 * 3.0
    pred = gt + 0.2 * rng.standard_normal(shape)
    ours = volume_metrics(torch.from_numpy(pred), torch.from_numpy(gt))
    assert ours["psnr"] == pytest.approx(float(ref["psnr"](gt, pred)), abs=1e-6)
    assert ours["ssim"] == pytest.approx(float(ref["ssim"](gt, pred)[0]), abs=1e-6)
    assert ours["nmse"] == pytest.approx(float(ref["nmse"](gt, pred)), rel=1e-6)
    # an explicit data range as fastMRI's maxval argument
    assert volume_metrics(pred, gt, maxval=5.0)["psnr"] == pytest.approx(
        float(ref["psnr"](gt, pred, maxval=5.0)), abs=1e-6)


def test_volume_metrics_rejects_mismatched_volumes() -> None:
    with pytest.raises(ValueError, match="recon"):
        volume_metrics(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))


def test_hu_window_metrics_and_summary() -> None:
    from fedrecon.datasets.ct import hu_to_attenuation

    hu = torch.linspace(-1000, 1500, 2 * 16 * 16).reshape(2, 16, 16)
    mu = hu_to_attenuation(hu)
    same = hu_window_metrics(mu, mu)
    assert same["ssim_hu"] == pytest.approx(1.0) and same["psnr_hu"] > 100
    # a 10 HU offset inside the (-160, 240) window: PSNR = 20 log10(400 / 10) where unclipped
    shifted = hu_to_attenuation(torch.full((1, 16, 16), 50.0))
    base = hu_to_attenuation(torch.full((1, 16, 16), 40.0))
    assert hu_window_metrics(shifted, base)["psnr_hu"] == pytest.approx(20 * np.log10(40), abs=1e-3)
    rows = [VolumeResult("a", torch.zeros(1), torch.zeros(1), {"psnr": 10.0, "ssim": 0.5,
                                                               "nmse": 0.1, "slices": 2}),
            VolumeResult("b", torch.zeros(1), torch.zeros(1), {"psnr": 20.0, "ssim": 0.7,
                                                               "nmse": 0.3, "slices": 4})]
    s = summarize(rows)
    assert (s["psnr"], s["ssim"], s["nmse"], s["volumes"]) == pytest.approx((15.0, 0.6, 0.2, 2))
