"""MRI sample transforms (pure functions) and a per-volume ESPIRiT coil-map cache.

Conventions: complex k-space ``(..., C, H, W)`` (singlecoil: ``C = 1``), centred as
:func:`fedrecon.operators.fft2c`; phase-encode columns are the last dim. The functions follow
fastMRI's ``fastmri/data/transforms.py`` semantics (mask padding, odd/even centre crop,
instance normalisation) on native complex tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np
import torch
from fedrecon.operators import SampledMask, espirit_maps, ifft2c, rss
from torch import Tensor

from .fastmri_write import atomic_h5_file

__all__ = [
    "CoilMapCache",
    "EspiritSettings",
    "acs_width",
    "apply_mask",
    "center_crop",
    "normalize",
    "normalize_instance",
    "rss_target",
    "zero_filled",
]

logger = logging.getLogger(__name__)
ArrayLike = TypeVar("ArrayLike", Tensor, np.ndarray)
MaskFunc = Callable[..., SampledMask]


def apply_mask(kspace: Tensor, mask_func: MaskFunc, seed: int | Sequence[int] | None = None,
               padding: tuple[int, int] | None = None,
               offset: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Undersample ``kspace`` with a mask drawn by ``mask_func`` (fastMRI's ``apply_mask``).

    Parameters
    ----------
    kspace : Tensor
        Complex ``(..., H, W)`` k-space, e.g. ``(C, H, W)``.
    mask_func : callable
        A mask function of :mod:`fedrecon.operators` (``RandomMask``, ``EquispacedMask``,
        ``VariableDensityMask2D``, ...): ``mask_func(shape, seed=seed)``.
    seed : int or tuple of int, optional
        Mask seed, e.g. ``tuple(map(ord, fname))`` for one mask per volume.
    padding : (start, stop), optional
        Acquired columns ``[start, stop)``; the mask is zeroed outside (fastMRI's VarNet
        transform with ``padding_left``/``padding_right``).
    offset : int, optional
        Offset of the equispaced 1D masks (1D mask functions only).

    Returns
    -------
    (masked_kspace, mask, num_low_frequencies)
        ``mask`` is float32 and broadcasts to ``kspace`` (``(1, ..., 1, W)`` for 1D masks).
    """
    shape = (1,) * (kspace.ndim - 3) + tuple(kspace.shape[-3:]) if kspace.ndim >= 3 \
        else tuple(kspace.shape)
    if offset is None:
        mask, num_low = mask_func(shape, seed=seed)
    else:
        mask, num_low = mask_func(shape, offset=offset, seed=seed)
    mask = mask.clone()
    if padding is not None:
        mask[..., : padding[0]] = 0
        mask[..., padding[1]:] = 0
    return kspace * mask.to(kspace.device), mask, int(num_low)


def center_crop(x: ArrayLike, size: Sequence[int]) -> ArrayLike:
    """Centre crop of the last two dims to ``size = (h, w)`` (fastMRI's ``center_crop``).

    The crop starts at ``(H - h) // 2``, so for odd differences the extra row/column is
    dropped at the end. Works on torch tensors (real or complex) and numpy arrays.
    """
    h, w = (int(s) for s in size)
    if not (0 < h <= x.shape[-2] and 0 < w <= x.shape[-1]):
        raise ValueError(f"center_crop: argument 'size' {(h, w)} must lie within the last two "
                         f"dims of the input {tuple(x.shape[-2:])}")
    top = (x.shape[-2] - h) // 2
    left = (x.shape[-1] - w) // 2
    return x[..., top: top + h, left: left + w]


def zero_filled(kspace: Tensor) -> Tensor:
    """Zero-filled magnitude image: ``ifft2c`` then RSS over the coil dim.

    ``(..., C, H, W) -> (..., H, W)`` (a single coil gives its magnitude); a 2D ``(H, W)``
    input is treated as one coil.
    """
    image = ifft2c(kspace)
    return image.abs() if kspace.ndim == 2 else rss(image, dim=-3)


def rss_target(kspace: Tensor | np.ndarray, crop_size: Sequence[int] | None = None) -> Tensor:
    """fastMRI's ``reconstruction_rss`` of fully sampled k-space: RSS of the coil images,
    centre-cropped to ``crop_size``; float32 ``(..., h, w)``."""
    ksp = torch.as_tensor(kspace)
    image = zero_filled(ksp)
    if crop_size is not None:
        image = center_crop(image, crop_size)
    return image.to(torch.float32).contiguous()


def normalize(x: Tensor, mean: float | Tensor, std: float | Tensor,
              eps: float = 0.0) -> Tensor:
    """``(x - mean) / (std + eps)``."""
    return (x - mean) / (std + eps)


def normalize_instance(x: Tensor, eps: float = 1e-11) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise by the sample's own mean and standard deviation (fastMRI's U-Net inputs).

    Returns
    -------
    (normalized, mean, std)
        Undo with ``normalized * (std + eps) + mean``.
    """
    mean, std = x.mean(), x.std()
    return normalize(x, mean, std, eps), mean, std


def acs_width(mask: Tensor | np.ndarray) -> int:
    """Width of the contiguous run of sampled columns around the centre column ``W // 2``
    (the ACS region of a 1D mask given as ``(..., W)``)."""
    cols = np.asarray(mask, dtype=np.float32).reshape(-1, np.shape(mask)[-1]).max(axis=0) > 0
    centre = cols.shape[0] // 2
    if not cols[centre]:
        return 0
    left = centre
    while left > 0 and cols[left - 1]:
        left -= 1
    right = centre
    while right + 1 < cols.shape[0] and cols[right + 1]:
        right += 1
    return right - left + 1


# -- coil-map cache ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EspiritSettings:
    """ESPIRiT parameters (see :func:`fedrecon.operators.espirit_maps`). The calibration
    width actually used is ``min(calib_width, num_low_frequencies)`` so that only sampled
    ACS lines are calibrated on."""

    calib_width: int = 24
    thresh: float = 0.02
    kernel_width: int = 6
    crop: float = 0.95
    max_iter: int = 100


_CACHE_FORMAT = 1
_HASH_SLICES = "first+last"


_MIN_KERNEL = 3  # the narrowest ESPIRiT kernel the coil-map cache runs


class CoilMapCache:
    """ESPIRiT maps computed once per volume (all slices at once) and kept in sidecar files.

    A sidecar ``<cache_dir>/<stem>-<key[:20]>.maps.h5`` holds ``maps`` complex64
    ``(S, C, H, W)`` for every slice; ``key`` (also stored in the sidecar and checked on
    read) is a SHA-256 over

    - the source file's identity: size, ``mtime_ns``, the k-space dataset's shape and dtype,
      and a BLAKE2 digest of its first and last slice. Size + mtime catch any in-place edit
      (writes update mtime) for the cost of one ``stat``; the content digest catches a path
      that now holds another volume with the same size and a preserved mtime (``rsync -a``,
      ``cp -p`` of a sibling volume: fastMRI volumes often share one shape). A full-file
      hash would read the whole volume (hundreds of MB) per volume and worker, for no gain
      on write-once raw data;
    - the settings: :class:`EspiritSettings`, the effective calibration width;
    - the mask: a digest of the mask array (after padding) and ``num_low_frequencies``,
      which covers the mask function, its seed (the file name) and acceleration.

    The identity digest is memoised per ``(path, size, mtime_ns)``, so a cache hit costs a
    ``stat`` and the read of one slice of maps. Sidecars are written atomically; concurrent
    writers (DataLoader workers) produce identical files and the last move wins.

    Parameters
    ----------
    cache_dir : path, optional
        Folder of the sidecars; default ``<folder of the volume>/.fedrecon-cache``.
    settings : EspiritSettings
        ESPIRiT parameters.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None,
                 settings: EspiritSettings = EspiritSettings()) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.settings = settings
        self._identity: dict[tuple[str, int, int], str] = {}

    def __repr__(self) -> str:
        return f"CoilMapCache(cache_dir={self.cache_dir}, settings={self.settings})"

    # -- keys ----------------------------------------------------------------------------
    def _file_identity(self, path: Path) -> str:
        st = path.stat()
        memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        ident = self._identity.get(memo_key)
        if ident is None:
            digest = hashlib.blake2b(digest_size=20)
            with h5py.File(path, "r") as hf:
                ds = hf["kspace"]
                digest.update(repr((ds.shape, ds.dtype.str)).encode())
                digest.update(np.ascontiguousarray(ds[0]).tobytes())
                digest.update(np.ascontiguousarray(ds[ds.shape[0] - 1]).tobytes())
            ident = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "content": f"{_HASH_SLICES}:{digest.hexdigest()}"})
            self._identity[memo_key] = ident
        return ident

    def calib_width(self, num_low_frequencies: int) -> int:
        """The calibration width used for a mask with ``num_low_frequencies`` ACS columns."""
        width = self.settings.calib_width
        if num_low_frequencies > 0:
            width = min(width, int(num_low_frequencies))
        return width

    def kernel_width(self, num_low_frequencies: int) -> int:
        """The ESPIRiT kernel width used for a mask with ``num_low_frequencies`` ACS columns
        (:meth:`accepts` tells whether :meth:`compute_volume` runs with it)."""
        # A kernel wider than half the calibration region leaves too few calibration rows
        # for the null space and ESPIRiT returns all-zero maps (seen: 8 ACS lines, kernel 6).
        return min(self.settings.kernel_width, self.calib_width(num_low_frequencies) // 2)

    def accepts(self, num_low_frequencies: int) -> bool:
        """Whether :meth:`compute_volume` accepts a mask with ``num_low_frequencies`` ACS
        columns (an ESPIRiT kernel of at least 3)."""
        return self.kernel_width(num_low_frequencies) >= _MIN_KERNEL

    def key(self, path: str | os.PathLike, mask: Tensor, num_low_frequencies: int) -> str:
        """The cache key of ``path`` masked with ``mask`` (see the class docstring)."""
        mask_np = np.ascontiguousarray(mask.detach().cpu().numpy(), dtype=np.float32)
        payload = {
            "format": _CACHE_FORMAT,
            "file": self._file_identity(Path(path)),
            "settings": dataclasses.asdict(self.settings),
            "calib_width_used": self.calib_width(num_low_frequencies),
            "mask": hashlib.blake2b(mask_np.tobytes() + repr(mask_np.shape).encode(),
                                    digest_size=16).hexdigest(),
            "num_low_frequencies": int(num_low_frequencies),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def sidecar_path(self, path: str | os.PathLike, key: str) -> Path:
        path = Path(path)
        folder = self.cache_dir if self.cache_dir is not None else path.parent / ".fedrecon-cache"
        return folder / f"{path.stem}-{key[:20]}.maps.h5"

    # -- access --------------------------------------------------------------------------
    def get(self, path: str | os.PathLike, slice_num: int, mask: Tensor,
            num_low_frequencies: int) -> Tensor:
        """Coil maps ``(C, H, W)`` complex64 of one slice; computes the volume on a miss.

        Parameters
        ----------
        path : path
            fastMRI multicoil file (``kspace`` ``(S, C, H, W)``).
        slice_num : int
            Slice index.
        mask : Tensor
            The volume's mask, broadcastable to ``(C, H, W)`` (applied before ESPIRiT: the
            maps use only the sampled ACS lines, as a site would).
        num_low_frequencies : int
            ACS width of ``mask``.
        """
        key = self.key(path, mask, num_low_frequencies)
        sidecar = self.sidecar_path(path, key)
        if sidecar.exists():
            try:
                with h5py.File(sidecar, "r") as hf:
                    if hf.attrs.get("key") == key:
                        return torch.from_numpy(hf["maps"][slice_num])
                logger.warning("coil-map sidecar %s has another key; recomputing", sidecar)
            except (OSError, KeyError) as err:
                logger.warning("coil-map sidecar %s is unreadable (%s); recomputing", sidecar, err)
        maps = self.compute_volume(path, mask, num_low_frequencies)
        self._write(sidecar, maps, key, Path(path))
        return torch.from_numpy(maps[slice_num])

    def compute_volume(self, path: str | os.PathLike, mask: Tensor,
                       num_low_frequencies: int) -> np.ndarray:
        """ESPIRiT maps ``(S, C, H, W)`` complex64 of every slice of the masked volume."""
        with h5py.File(path, "r") as hf:
            kspace = torch.from_numpy(np.asarray(hf["kspace"][()], dtype=np.complex64))
        if kspace.ndim != 4:
            raise ValueError(f"{path}: coil maps need multicoil k-space (S, C, H, W); "
                             f"got {tuple(kspace.shape)}")
        calib = self.calib_width(num_low_frequencies)
        kernel = self.kernel_width(num_low_frequencies)
        if not self.accepts(num_low_frequencies):
            raise ValueError(
                f"{path}: the ACS region ({num_low_frequencies} columns) is too narrow for "
                f"ESPIRiT (needs at least 6 fully sampled centre columns); use a mask with "
                "more low frequencies")
        s = self.settings
        maps = espirit_maps(kspace * mask, calib_width=calib, thresh=s.thresh,
                            kernel_width=kernel, crop=s.crop, max_iter=s.max_iter)
        energy = maps.abs().square().sum(dim=(-3, -2, -1))
        if bool((energy == 0).any()):
            bad = [int(i) for i in torch.nonzero(energy == 0).flatten()]
            raise ValueError(f"{path}: ESPIRiT found no coil sensitivities for slices {bad[:5]} "
                             f"(calibration width {calib}, kernel {kernel}); use a mask with "
                             "more low frequencies or lower EspiritSettings.crop/thresh")
        return maps.to(torch.complex64).numpy()

    def _write(self, sidecar: Path, maps: np.ndarray, key: str, source: Path) -> None:
        try:
            with atomic_h5_file(sidecar, overwrite=True) as hf:
                hf.create_dataset("maps", data=maps)
                hf.attrs["key"] = key
                hf.attrs["source"] = source.name
                hf.attrs["settings"] = json.dumps(dataclasses.asdict(self.settings))
        except OSError as err:
            raise OSError(f"cannot write the coil-map cache {sidecar} ({err}); pass a writable "
                          "cache_dir") from err
