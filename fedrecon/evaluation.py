"""Volume-wise evaluation with fastMRI's definitions, and the classical baselines.

fastMRI evaluates per *volume*: PSNR over the whole volume with the volume's maximum as the
data range, SSIM per slice (7x7 window) with that same range averaged over the slices,
NMSE over the volume; then the mean over volumes. :func:`volume_metrics` does exactly that
(float64); :func:`evaluate_volumes` reconstructs every slice of a loader with a method,
stacks the slices of each volume and scores them. CT adds PSNR/SSIM in a HU window.

Methods are callables ``Prepared -> image`` in the target's space (magnitude, centre crop
for MRI; linear attenuation for CT). Baselines: ``zero_filled``, ``sense`` (CG-SENSE) and
``tv`` for MRI; ``fbp`` and ``tv`` for CT. Their free parameter (Tikhonov weight, TV weight,
FBP window) is chosen on a tuning loader (the site's validation split) by PSNR: a fair,
tuned baseline rather than an arbitrary one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from fedrecon.metrics import nmse, ssim
from fedrecon.train.batching import OpFactory, Prepared, prepare_batch, to_target_space
from fedrecon.train.loop import reconstruct

__all__ = [
    "BASELINES",
    "HU_WINDOW",
    "Method",
    "VolumeResult",
    "baseline_methods",
    "evaluate_volumes",
    "model_method",
    "volume_metrics",
]

Method = Callable[[Prepared], Tensor]
HU_WINDOW = (-160.0, 240.0)  # head CT: (level 40, width 400) HU


def volume_metrics(recon: Tensor | np.ndarray, target: Tensor | np.ndarray,
                   maxval: float | None = None) -> dict[str, float]:
    """fastMRI's volume metrics of ``(S, H, W)`` arrays (float64): PSNR with data range
    ``maxval`` (default: the target volume's max), SSIM per slice with that range then
    averaged, NMSE over the volume.

    Complex arrays are scored by their magnitude, as fastMRI scores magnitude images. The
    data range must be positive: an all-zero (or all-negative) target without ``maxval`` is
    a ``ValueError`` rather than a silent ``-inf`` / ``nan``. A perfect reconstruction gets a
    finite PSNR (the MSE is floored at 1e-300) where fastMRI's would be ``inf``."""
    x, t = _magnitude(recon), _magnitude(target)
    if x.shape != t.shape or x.ndim != 3:
        raise ValueError(f"volume_metrics: 'recon' {tuple(x.shape)} and 'target' "
                         f"{tuple(t.shape)} must be equal (S, H, W) volumes")
    dr = float(t.max()) if maxval is None else float(maxval)
    if not dr > 0:
        what = "argument 'maxval'" if maxval is not None else "the target volume's maximum"
        raise ValueError(f"volume_metrics: {what} is {dr}; PSNR and SSIM need a positive "
                         f"data range")
    mse = float((x - t).square().mean())
    return {"psnr": 10.0 * float(np.log10(dr**2 / max(mse, 1e-300))),
            "ssim": float(ssim(x, t, dr).mean()),
            "nmse": float(nmse(x.reshape(1, -1, x.shape[-1]), t.reshape(1, -1, t.shape[-1]))[0])}


def _magnitude(a: Tensor | np.ndarray) -> Tensor:
    """``a`` as a float64 CPU tensor; complex values by their magnitude."""
    t = torch.as_tensor(a.detach().cpu() if isinstance(a, Tensor) else np.asarray(a))
    return (t.abs() if t.is_complex() else t).to(torch.float64)


def _hu(mu: Tensor) -> Tensor:
    from fedrecon.datasets.ct import attenuation_to_hu

    return attenuation_to_hu(mu)


def hu_window_metrics(recon: Tensor, target: Tensor,
                      window: tuple[float, float] = HU_WINDOW) -> dict[str, float]:
    """CT: PSNR/SSIM of the volumes converted to HU and clipped to ``window`` (data range:
    the window's width), the numbers a radiologist's display would give."""
    lo, hi = window
    x = _hu(recon.double()).clamp(lo, hi) - lo
    t = _hu(target.double()).clamp(lo, hi) - lo
    m = volume_metrics(x, t, maxval=hi - lo)
    return {"psnr_hu": m["psnr"], "ssim_hu": m["ssim"]}


@dataclass
class VolumeResult:
    """One volume: its reconstruction and target stacks (slice order) and metrics."""

    fname: str
    recon: Tensor  # (S, H, W) float32, CPU
    target: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_volumes(method: Method, loader: Iterable, *, op_factory: OpFactory | None = None,
                     device: torch.device | str = "cpu", ct: bool | None = None
                     ) -> list[VolumeResult]:
    """Reconstruct every slice of ``loader`` with ``method``; group by volume (file name),
    order by slice number, and score each volume with :func:`volume_metrics` (plus the HU
    window metrics for CT)."""
    dev = torch.device(device)
    slices: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    is_ct = ct
    for batch in loader:
        prep = prepare_batch(batch, dev, op_factory)
        if prep.target is None:
            raise ValueError("evaluation needs targets; this batch has none")
        if is_ct is None:
            is_ct = not prep.is_mri
        out = method(prep).float().cpu()
        for i, (fname, s) in enumerate(zip(prep.fnames, prep.slice_nums)):
            slices.setdefault(fname, {})[s] = (out[i], prep.target[i].float().cpu())
    if not slices:
        raise ValueError("argument 'loader' yielded no batches")
    results = []
    for fname, by_slice in slices.items():
        order = sorted(by_slice)
        recon = torch.stack([by_slice[s][0] for s in order])
        target = torch.stack([by_slice[s][1] for s in order])
        try:
            m = volume_metrics(recon, target)
        except ValueError as err:
            raise ValueError(f"volume {fname!r}: {err}") from None
        if is_ct:
            m |= hu_window_metrics(recon, target)
        m["slices"] = float(len(order))
        results.append(VolumeResult(fname, recon, target, m))
    return results


def summarize(results: Sequence[VolumeResult]) -> dict[str, float]:
    """Mean of each metric over volumes (fastMRI's final average), and the volume count."""
    keys = [k for k in results[0].metrics if k != "slices"]
    return {k: float(np.mean([r.metrics[k] for r in results])) for k in keys} | {
        "volumes": float(len(results))}


# -- methods ---------------------------------------------------------------------------------
def model_method(model: nn.Module) -> Method:
    model.eval()
    return lambda prep: reconstruct(model, prep)


def _zero_filled(prep: Prepared) -> Tensor:
    """RSS of the zero-filled coil images, centre-cropped like the target."""
    from fedrecon.datasets.mri_transforms import zero_filled

    y = prep.y if prep.y.ndim == 4 else prep.y[:, None]
    img = zero_filled(y)
    if prep.crop_size is None:
        return img
    h, w = prep.crop_size
    hh, ww = img.shape[-2:]
    if h > hh or w > ww:
        return img
    top, left = (hh - h) // 2, (ww - w) // 2
    return img[..., top: top + h, left: left + w]


def _sense(lam: float) -> Method:
    from fedrecon.operators import cg_sense

    return lambda prep: to_target_space(cg_sense(prep.op, prep.y, lam=lam, n_iter=30), prep)


def _tv(weight: float, n_iter: int = 150) -> Method:
    """TV with weight ``weight * max|A^H y|``: relative to the data's scale."""
    from fedrecon.operators import tv_reconstruction

    def method(prep: Prepared) -> Tensor:
        lam = float(weight * prep.op.A_adjoint(prep.y).abs().amax())
        x = tv_reconstruction(prep.op, prep.y, lam=lam, n_iter=n_iter)
        return to_target_space(x, prep) if x.is_complex() else x.clamp_min(0)
    return method


def _fbp(window: str) -> Method:
    """FBP with the site's window; a short fan scan gets Parker weights, as the dataset's
    own ``return_fbp`` does."""
    from fedrecon.operators import fbp, is_short_scan

    return lambda prep: fbp(prep.op, prep.y, window, parker=is_short_scan(prep.op)).clamp_min(0)


# name -> modality -> candidate methods (parameter, method); the tuning picks one
BASELINES: dict[str, dict[str, list[tuple[str, Method]]]] = {
    "zero_filled": {"mri": [("-", _zero_filled)]},
    "sense": {"mri": [(f"lam={lam:g}", _sense(lam)) for lam in (0.0, 1e-3, 1e-2)]},
    "tv": {"mri": [(f"w={w:g}", _tv(w)) for w in (1e-3, 3e-3, 1e-2)],
           "ct": [(f"w={w:g}", _tv(w)) for w in (1e-3, 3e-3, 1e-2)]},
    "fbp": {"ct": [(w, _fbp(w)) for w in ("ramp", "shepp-logan", "cosine", "hann")]},
}


def default_baselines(modality: str) -> list[str]:
    return [name for name, by in BASELINES.items() if modality in by]


def baseline_methods(names: Sequence[str], modality: str, tuning: Iterable | None,
                     device: torch.device | str = "cpu") -> dict[str, tuple[str, Method]]:
    """``name -> (chosen parameter, method)`` for the baselines ``names`` of ``modality``;
    each one's parameter is the best (mean volume PSNR) on ``tuning`` when given."""
    out: dict[str, tuple[str, Method]] = {}
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline '{name}'; valid: {', '.join(BASELINES)}")
        candidates = BASELINES[name].get(modality)
        if candidates is None:
            raise ValueError(f"baseline '{name}' does not apply to {modality.upper()}; "
                             f"valid: {', '.join(default_baselines(modality))}")
        if len(candidates) == 1 or tuning is None:
            out[name] = candidates[len(candidates) // 2]
            continue
        scores = {param: summarize(evaluate_volumes(m, tuning, device=device))["psnr"]
                  for param, m in candidates}
        best = max(scores, key=scores.get)
        out[name] = next(c for c in candidates if c[0] == best)
    return out


def per_method_table(rows: Sequence[Mapping[str, object]], metrics: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts with 'site', 'method' and the metrics)."""
    head = "| site | method | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        cells = []
        for m in metrics:
            v = r.get(m)
            cells.append("" if v is None else (f"{v:.4f}" if m in ("ssim", "ssim_hu") else
                                               f"{v:.5f}" if m == "nmse" else f"{v:.2f}"))
        lines.append(f"| {r['site']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
