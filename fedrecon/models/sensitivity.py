"""A learned coil-sensitivity estimator (E2E VarNet style; Sriram et al., MICCAI 2020).

ESPIRiT needs a calibration pass per volume and fixed parameters. The estimator computes
the maps from each slice's own auto-calibration (ACS) region instead: the coil images of
the ACS k-space (everything else zeroed) are refined one coil at a time by a small U-Net,
then divided by their root-sum-of-squares, so ``sum_c |S_c|^2 = 1`` wherever the signal
is. It is trained end to end with the reconstruction and is ``ESTIMATOR``: LOCAL by default,
because coil arrays are site hardware. With a zero-initialized U-Net it starts as the
classical ACS estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedrecon.operators import ifft2c

from .priors import ImagePrior, UNet
from .roles import Role

__all__ = ["SensitivityNet", "acs_region", "acs_coil_maps"]


def _centered_run(sampled: Tensor) -> Tensor:
    """Length of the contiguous run of True around the centre of the last dim: ``(..., N)
    -> (...)`` (0 when the centre is not sampled)."""
    n = sampled.shape[-1]
    c = n // 2
    right = torch.cumprod(sampled[..., c:].int(), dim=-1).sum(-1)
    left = torch.cumprod(sampled[..., :c].flip(-1).int(), dim=-1).sum(-1)
    return torch.where(sampled[..., c], left + right, torch.zeros_like(left))


def acs_region(mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """The fully sampled central box of each sample's mask as a 0/1 ``(B, H, W)`` tensor.

    ``mask`` broadcasts to ``(B, ..., H, W)``. Columns: the contiguous sampled run through
    the centre along the centre row; rows likewise along the centre column (all rows for a
    1D Cartesian mask, the calibration box for a 2D one)."""
    h, w = shape
    m = mask.abs() > 0
    m = m.expand(*m.shape[:-2], h, w).reshape(-1, h, w)  # (B or 1, H, W): coil dim is 1
    cols = _centered_run(m[:, h // 2, :])  # (B,)
    rows = _centered_run(m[:, :, w // 2])
    yy = torch.arange(h, device=mask.device)
    xx = torch.arange(w, device=mask.device)
    top = h // 2 - torch.div(rows, 2, rounding_mode="floor")
    left = w // 2 - torch.div(cols, 2, rounding_mode="floor")
    in_rows = (yy[None] >= top[:, None]) & (yy[None] < (top + rows)[:, None])
    in_cols = (xx[None] >= left[:, None]) & (xx[None] < (left + cols)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).to(torch.float32)


def _normalize(images: Tensor, eps: float = 1e-12) -> Tensor:
    rss = images.abs().square().sum(dim=-3, keepdim=True).sqrt()
    return images / rss.clamp_min(eps * rss.amax().clamp_min(eps))


def acs_coil_maps(kspace: Tensor, mask: Tensor) -> Tensor:
    """Classical ACS maps: coil images of the ACS region's k-space, RSS-normalized.
    ``kspace (B, C, H, W)`` -> maps ``(B, C, H, W)``."""
    acs = acs_region(mask, kspace.shape[-2:]).to(kspace.real.dtype)
    return _normalize(ifft2c(kspace * acs[:, None]))


class SensitivityNet(nn.Module):
    """``maps = RSS-normalize(u + UNet(u))`` with ``u = ifft2c(ACS(y))``, per coil.

    Parameters
    ----------
    chans, num_pools
        Width and depth of the per-coil U-Net (2 channels: real, imaginary).
    """

    role = Role.ESTIMATOR
    role_sealed = True  # the U-Net inside is part of the estimator, not of the prior

    def __init__(self, chans: int = 8, num_pools: int = 2) -> None:
        super().__init__()
        self.refine = ImagePrior(UNet(2, 2, chans=chans, num_pools=num_pools, norm="instance"),
                                 align_phase=False)

    def forward(self, kspace: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = kspace.shape
        acs = acs_region(mask, (h, w)).to(kspace.real.dtype)
        if bool((acs.flatten(1).sum(1) == 0).any()):
            raise ValueError("SensitivityNet: a sample's mask has no sampled centre (no ACS "
                             "region to estimate coil sensitivities from)")
        images = ifft2c(kspace * acs[:, None])
        refined = self.refine(images.reshape(b * c, h, w)).reshape(b, c, h, w)
        return _normalize(refined)
