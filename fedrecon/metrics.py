"""Image-quality metrics with fastMRI's conventions, in torch (differentiable, any device).

- ``psnr``: ``10 log10(data_range^2 / MSE)``; fastMRI uses the volume's maximum as the range.
- ``ssim``: Wang et al. 2004 with a 7x7 uniform window, ``K1 = 0.01``, ``K2 = 0.03``, sample
  covariance (N-1) and the border of half a window excluded, i.e. scikit-image's
  ``structural_similarity`` defaults that fastMRI's evaluation calls.
- ``nmse``: ``||x - ref||^2 / ||ref||^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nmse", "psnr", "ssim"]


def _real(name: str, *args: Tensor) -> None:
    if any(a.is_complex() for a in args):
        raise ValueError(f"{name}: complex input; pass magnitude images (x.abs()), as fastMRI "
                         f"scores them")


def _range(ref: Tensor, data_range: float | Tensor | None) -> Tensor:
    if data_range is None:
        return ref.flatten(-2).amax(-1)
    return torch.as_tensor(data_range, dtype=ref.dtype, device=ref.device)


def nmse(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image NMSE over the last two dims: ``(..., H, W) -> (...)``."""
    _real("nmse", x, ref)
    return (x - ref).square().flatten(-2).sum(-1) / ref.square().flatten(-2).sum(-1).clamp_min(1e-30)


def psnr(x: Tensor, ref: Tensor, data_range: float | Tensor | None = None) -> Tensor:
    """Per-image PSNR in dB: ``(..., H, W) -> (...)``; ``data_range`` defaults to ``ref.max()``."""
    _real("psnr", x, ref)
    mse = (x - ref).square().flatten(-2).mean(-1).clamp_min(1e-30)
    return 10 * torch.log10(_range(ref, data_range) ** 2 / mse)


def ssim(x: Tensor, ref: Tensor, data_range: float | Tensor | None = None,
         win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per-image SSIM: ``(..., H, W) -> (...)`` (scikit-image's defaults, see module doc)."""
    _real("ssim", x, ref)
    if x.shape != ref.shape:
        raise ValueError(f"ssim: arguments 'x' {tuple(x.shape)} and 'ref' {tuple(ref.shape)} differ")
    h, w = x.shape[-2:]
    if min(h, w) < win_size:
        raise ValueError(f"ssim: images must be at least {win_size}x{win_size}; got {h}x{w}")
    lead = x.shape[:-2]
    dr = _range(ref, data_range).reshape(-1, 1, 1, 1).expand(x[..., :1, :1].numel(), 1, 1, 1)
    a = x.reshape(-1, 1, h, w)
    b = ref.reshape(-1, 1, h, w)
    n = win_size * win_size
    kernel = torch.full((1, 1, win_size, win_size), 1.0 / n, dtype=a.dtype, device=a.device)
    mu_a, mu_b = F.conv2d(a, kernel), F.conv2d(b, kernel)
    cov = n / (n - 1)
    s_aa = cov * (F.conv2d(a * a, kernel) - mu_a * mu_a)
    s_bb = cov * (F.conv2d(b * b, kernel) - mu_b * mu_b)
    s_ab = cov * (F.conv2d(a * b, kernel) - mu_a * mu_b)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return smap.flatten(1).mean(-1).reshape(lead)
