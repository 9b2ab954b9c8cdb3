"""From a collated dataset batch to what an unrolled network needs: the site's operator,
the measurements, the target and the protocol vector.

The operator is built here, at the site, from the batch's own parameters (coil maps and
masks for MRI; the site's acquisition for CT). Nothing in a batch leaves the site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedrecon.operators import LinearOperator, MultiCoilMRI, SingleCoilMRI

__all__ = ["Prepared", "prepare_batch", "to_target_space", "OpFactory"]


@dataclass(frozen=True)
class Prepared:
    """One batch ready for ``model(y, op, protocol=protocol)``."""

    op: LinearOperator
    y: Tensor
    target: Tensor | None  # (B, h, w) real
    protocol: Tensor  # (B, P)
    max_value: Tensor  # (B,) data range for PSNR/SSIM
    crop_size: tuple[int, int] | None  # MRI: the target's size inside the reconstruction
    fnames: list[str]
    slice_nums: list[int]

    @property
    def is_mri(self) -> bool:
        return self.y.is_complex()


OpFactory = Callable[[Any, torch.device], LinearOperator]


def _mri_operator(batch: Any, device: torch.device) -> LinearOperator:
    mask = batch.mask.to(device)
    if batch.coil_maps is None:
        if batch.kspace.shape[-3] != 1:
            raise ValueError("a multicoil batch needs coil_maps (load the dataset with "
                             "coil_maps='espirit' or supply an op_factory)")
        return SingleCoilMRI(mask[:, 0] if mask.ndim == 4 else mask,
                             image_size=tuple(batch.kspace.shape[-2:]))
    return MultiCoilMRI(batch.coil_maps.to(device), mask)


def prepare_batch(batch: Any, device: torch.device | str = "cpu",
                  op_factory: OpFactory | None = None) -> Prepared:
    """Build the operator for ``batch`` (an MRI or CT batch from ``fedrecon.datasets``)."""
    device = torch.device(device)
    if hasattr(batch, "kspace"):  # MRI
        op = op_factory(batch, device) if op_factory else _mri_operator(batch, device)
        y = batch.kspace.to(device)
        if isinstance(op, SingleCoilMRI):
            y = y[:, 0]
        target = batch.target.to(device) if batch.target is not None else None
        max_value = torch.as_tensor(batch.max_value, dtype=torch.float32, device=device).reshape(-1)
        crops = {tuple(c) for c in batch.crop_size}
        if len(crops) != 1:
            raise ValueError(f"a batch must share one crop size; got {sorted(crops)}")
        crop = crops.pop()
        fnames, slices = list(batch.fname), [int(s) for s in batch.slice_num]
    elif hasattr(batch, "sinogram"):  # CT
        op = op_factory(batch, device) if op_factory else batch.acquisition.make_operator()
        op = op.to(device)
        y = batch.sinogram.to(device)
        target = batch.target.to(device)
        max_value = target.flatten(1).amax(1)
        crop = None
        fnames, slices = list(batch.fname), [int(s) for s in batch.slice_num]
    else:
        raise TypeError(f"cannot prepare a batch of type {type(batch).__name__}; expected an MRI "
                        f"batch (with 'kspace') or a CT batch (with 'sinogram')")
    protocol = batch.protocol.to(device=device, dtype=torch.float32)
    return Prepared(op, y, target, protocol, max_value, crop, fnames, slices)


def to_target_space(x: Tensor, prepared: Prepared) -> Tensor:
    """The reconstruction as the target sees it: magnitude and centre crop for MRI."""
    if not x.is_complex():
        return x
    img = x.abs()
    if prepared.crop_size is None:
        return img
    h, w = prepared.crop_size
    hh, ww = img.shape[-2:]
    if h > hh or w > ww:  # fastMRI: images smaller than the crop are used whole
        return img
    top, left = (hh - h) // 2, (ww - w) // 2
    return img[..., top : top + h, left : left + w]
