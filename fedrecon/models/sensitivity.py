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

__all__ = ["SensitivityNet", "acs_coil_maps", "acs_region"]


def _centered_run(sampled: Tensor) -> tuple[Tensor, Tensor]:
    """The contiguous run of True through the centre ``c = N // 2`` of the last dim, as its
    extent ``(before, after)``: the run is ``[c - before, c + after)``; ``(...)`` tensors,
    both 0 when the centre is not sampled. The run may be asymmetric (an odd-width fastMRI
    band in an even number of columns, or vice versa; a sampled line next to the band)."""
    n = sampled.shape[-1]
    c = n // 2
    after = torch.cumprod(sampled[..., c:].int(), dim=-1).sum(-1)
    before = torch.cumprod(sampled[..., :c].flip(-1).int(), dim=-1).sum(-1)
    return torch.where(sampled[..., c], before, torch.zeros_like(before)), after


def acs_region(mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """The fully sampled central box of each sample's mask as a 0/1 ``(B, H, W)`` tensor.

    ``mask`` broadcasts to ``(B, ..., H, W)``. Columns: the contiguous sampled run through
    the centre along the centre row; rows likewise along the centre column (all rows for a
    1D Cartesian mask, the calibration box for a 2D one)."""
    h, w = shape
    m = mask != 0  # weighted, complex or boolean masks
    m = m.expand(*m.shape[:-2], h, w).reshape(-1, h, w)  # (B or 1, H, W): coil dim is 1
    left, right = _centered_run(m[:, h // 2, :])  # (B,)
    up, down = _centered_run(m[:, :, w // 2])
    yy = torch.arange(h, device=mask.device)
    xx = torch.arange(w, device=mask.device)
    in_rows = (yy[None] >= (h // 2 - up)[:, None]) & (yy[None] < (h // 2 + down)[:, None])
    in_cols = (xx[None] >= (w // 2 - left)[:, None]) & (xx[None] < (w // 2 + right)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).to(torch.float32)


def _normalize(images: Tensor, eps: float = 1e-12) -> Tensor:
    """``images / RSS`` over coils (dim -3). The RSS is floored at ``eps`` times each
    sample's own largest RSS (a sample's maps do not depend on the rest of the batch), and
    the square root never sees 0 (its infinite derivative there made NaN gradients): a zero
    RSS gives zero maps with finite gradients."""
    power = images.abs().square().sum(dim=-3, keepdim=True)
    rss = power.clamp_min(torch.finfo(power.dtype).tiny).sqrt()
    floor = eps * rss.detach().amax(dim=(-2, -1), keepdim=True).clamp_min(eps)
    return images / rss.clamp_min(floor)


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
