"""Helpers of the Cartesian MRI operators (``mri``): mask validation and structure, the
centring checkerboard, the FFT normalisation when the scale is folded into the mask, and
torch's coil combine."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_real, check_tensor, complex_dtype_of, format_shape


def _checkerboard(h: int, w: int, sign: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``sign * (-1)^(i + j)`` as an ``(h, w)`` real tensor."""
    i = torch.arange(h, device=device).view(h, 1)
    j = torch.arange(w, device=device).view(1, w)
    return (1 - 2 * ((i + j) % 2)).to(dtype) * sign


def _same_rows(mask: Tensor) -> Tensor | None:
    """``mask (..., h, w)``'s first row ``(..., 1, w)`` when every row equals it (a 1D mask
    of columns, possibly weighted), else None."""
    if mask.shape[-2] > 1 and not bool((mask == mask[..., :1, :]).all()):
        return None
    return mask[..., :1, :]


def _column_support(mask: Tensor, w: int, device: torch.device | None = None) -> Tensor | None:
    """The sorted indices (on ``device``) of the columns ``mask (..., h, w)`` samples (non-zero
    for some leading index), or None when the mask is not column-structured (``w != W``, or
    its rows differ along ``H``)."""
    if mask.shape[-1] != w or _same_rows(mask) is None:
        return None
    cols = (mask[..., 0, :] != 0).reshape(-1, w).any(dim=0).nonzero().flatten()
    return cols if device is None else cols.to(device)


def _norm(inverse: bool, fold: bool) -> str:
    """torch's ``norm`` for an (inverse) FFT: orthonormal, or unscaled with ``fold`` (the
    scale then sits in the mask, ``_CartesianMRI._fold``)."""
    if not fold:
        return "ortho"
    return "forward" if inverse else "backward"


def _compute_dtype(x: Tensor) -> torch.dtype:
    if x.is_complex():
        return x.dtype
    if x.is_floating_point():
        return complex_dtype_of(x.dtype)
    return complex_dtype_of(torch.get_default_dtype())


def _as_mask(mask: Tensor, size: tuple[int, int] | None, owner: str, coil_dim: bool) -> Tensor:
    """Validate ``mask`` and reshape it to broadcast against ``(..., [1,] H, W)``.

    ``(W,)`` and ``(h, W)`` masks are image-plane masks; with ``coil_dim`` a mask of three or
    more dims must be ``(..., 1, h, w)`` (coil dim of size one). ``h``/``w`` may be 1.
    """
    check_tensor("mask", mask)
    if mask.dtype == torch.bool or not (mask.is_floating_point() or mask.is_complex()):
        mask = mask.to(torch.get_default_dtype())  # boolean / integer masks
    check_real("mask", mask, owner)
    if mask.ndim == 0:
        raise ValueError(f"{owner}: argument 'mask' must have at least one dim; got a scalar")
    if mask.ndim == 1:
        mask = mask.unsqueeze(0)
    if coil_dim:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        elif mask.shape[-3] != 1:
            raise ValueError(
                f"{owner}: argument 'mask' must be broadcastable to (..., 1, H, W) (one mask "
                f"shared by the coils); got {format_shape(tuple(mask.shape))}"
            )
    if size is not None:
        for got, want in zip(mask.shape[-2:], size):
            if got not in (1, want):
                expected = "(..., 1, H, W)" if coil_dim else "(..., H, W)"
                raise ValueError(
                    f"{owner}: argument 'mask' must be broadcastable to {expected} with "
                    f"(H, W) = {size}; got {format_shape(tuple(mask.shape))}"
                )
    return mask


def _coil_combine(maps: Tensor, z: Tensor) -> Tensor:
    """``sum_c conj(maps_c) * z_c`` over dim -3, accumulated coil by coil.

    Several times faster on the CPU than ``(maps.conj() * z).sum(-3)``, which materializes
    the coil-sized product; autograd-safe (only the fresh accumulator is updated in place).
    """
    if z.is_cuda:  # two fused kernels instead of one launch per coil
        return (maps.conj() * z).sum(dim=-3)
    out = maps[..., 0, :, :].conj() * z[..., 0, :, :]
    for c in range(1, z.shape[-3]):
        out = out.addcmul_(maps[..., c, :, :].conj(), z[..., c, :, :])
    return out
