"""Lazy slice dataset over official fastMRI HDF5 files (singlecoil/multicoil, knee/brain).

One file holds one volume (layout in :mod:`fedrecon.datasets.fastmri_write`). The dataset
keeps only a metadata index; each item opens its file, reads one slice, applies the volume's
mask (seeded by the file name, as fastMRI does, so every slice of a volume shares it and
every epoch sees the same one), crops the target and, optionally, fetches cached ESPIRiT
coil maps. Test/challenge files (a ``mask`` dataset, already undersampled k-space) keep the
file's mask.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import warnings
import xml.etree.ElementTree as etree
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor

from .fastmri_write import ISMRMRD_NAMESPACE
from .mri_transforms import CoilMapCache, MaskFunc, acs_width, center_crop

__all__ = [
    "FastMRIFormatError",
    "FastMRIReadError",
    "FastMRISliceDataset",
    "HeaderInfo",
    "MRIBatch",
    "MRISample",
    "SkippedFile",
    "VolumeInfo",
    "collate_mri_samples",
    "parse_ismrmrd_header",
    "read_volume_info",
]

logger = logging.getLogger(__name__)
Challenge = Literal["multicoil", "singlecoil"]
_TARGET_KEY = {"multicoil": "reconstruction_rss", "singlecoil": "reconstruction_esc"}
_KSPACE_RANK = {"multicoil": 4, "singlecoil": 3}


class FastMRIFormatError(ValueError):
    """A file is not a valid fastMRI volume (missing key, wrong dtype/shape, bad header)."""


class FastMRIReadError(FastMRIFormatError, OSError):
    """A file cannot be read as HDF5 (truncated, corrupt, unreadable)."""


# -- header --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeaderInfo:
    """What fastMRI reads from ``ismrmrd_header``.

    ``padding_left = enc_y // 2 - center`` and ``padding_right = padding_left + maximum + 1``
    (``kspace_encoding_step_1``): the acquired columns are ``[padding_left, padding_right)``.
    """

    encoding_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    padding_left: int
    padding_right: int


def _query(root: etree.Element, path: Sequence[str], fname: str) -> int:
    ns = {"ismrmrd": ISMRMRD_NAMESPACE}
    node = root.find("." + "".join(f"//ismrmrd:{el}" for el in path), ns)
    if node is None or node.text is None:
        raise FastMRIFormatError(
            f"{fname}: ismrmrd_header has no {'/'.join(path)} (expected ISMRMRD XML in the "
            f"namespace {ISMRMRD_NAMESPACE})")
    try:
        return int(node.text)
    except ValueError:
        raise FastMRIFormatError(f"{fname}: ismrmrd_header {'/'.join(path)} must be an "
                                 f"integer; got {node.text!r}") from None


def parse_ismrmrd_header(xml: bytes | str, fname: str = "<header>") -> HeaderInfo:
    """Parse the encoding/recon sizes and the acquired columns like fastMRI's ``SliceDataset``."""
    try:
        root = etree.fromstring(xml)
    except etree.ParseError as err:
        raise FastMRIFormatError(f"{fname}: ismrmrd_header is not valid XML ({err})") from None
    enc = ["encoding", "encodedSpace", "matrixSize"]
    rec = ["encoding", "reconSpace", "matrixSize"]
    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    enc_size = tuple(_query(root, enc + [a], fname) for a in "xyz")
    recon_size = tuple(_query(root, rec + [a], fname) for a in "xyz")
    center = _query(root, lims + ["center"], fname)
    maximum = _query(root, lims + ["maximum"], fname)
    padding_left = enc_size[1] // 2 - center
    return HeaderInfo(enc_size, recon_size, padding_left,  # type: ignore[arg-type]
                      padding_left + maximum + 1)


# -- per-volume metadata -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    """The metadata index entry of one file (no array data)."""

    path: Path
    n_slices: int
    n_coils: int
    kspace_shape: tuple[int, ...]
    encoding_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    padding_left: int
    padding_right: int
    max_value: float
    acquisition: str
    target_key: str | None
    has_mask: bool
    acceleration: float | None  # attrs of test files, when present
    num_low_frequency: int | None

    @property
    def is_test(self) -> bool:
        return self.has_mask


def read_volume_info(path: str | os.PathLike, challenge: Challenge) -> VolumeInfo:
    """Open ``path``, validate its fastMRI layout for ``challenge`` and return its metadata.

    Raises
    ------
    FastMRIReadError
        The file cannot be opened or read as HDF5 (truncated, corrupt).
    FastMRIFormatError
        A key is missing or has the wrong dtype/shape, or the header lacks a field.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as hf:
            return _volume_info(hf, path, challenge)
    except FastMRIFormatError:
        raise
    except (OSError, KeyError, RuntimeError) as err:
        raise FastMRIReadError(f"{path}: cannot read as a fastMRI HDF5 file ({err})") from err


def _volume_info(hf: h5py.File, path: Path, challenge: Challenge) -> VolumeInfo:
    rank = _KSPACE_RANK[challenge]
    layout = "(S, C, H, W)" if challenge == "multicoil" else "(S, H, W)"
    if "kspace" not in hf:
        raise FastMRIFormatError(f"{path}: missing dataset 'kspace' (expected complex64 "
                                 f"{layout}); found {sorted(hf.keys())}")
    ksp = hf["kspace"]
    if not isinstance(ksp, h5py.Dataset) or ksp.dtype.kind != "c":
        raise FastMRIFormatError(f"{path}: 'kspace' must be a complex64 dataset {layout}; "
                                 f"got dtype {getattr(ksp, 'dtype', type(ksp).__name__)}")
    if ksp.ndim != rank or min(ksp.shape) < 1:
        raise FastMRIFormatError(f"{path}: 'kspace' must have shape {layout} for the "
                                 f"{challenge} challenge; got {ksp.shape}")
    _check_complete(ksp, path)
    n_slices, width = ksp.shape[0], ksp.shape[-1]
    if "ismrmrd_header" not in hf:
        raise FastMRIFormatError(f"{path}: missing dataset 'ismrmrd_header' (ISMRMRD XML)")
    header = parse_ismrmrd_header(_header_text(hf, path), str(path))
    left, right = header.padding_left, header.padding_right
    if header.encoding_size[1] != width or not 0 <= left < right <= width:
        # fastMRI reads such files without a check; the acquired columns are kept inside
        # the k-space (a header written for another matrix should not make a file unusable)
        clipped = max(0, left), min(width, right)
        if clipped[0] >= clipped[1]:
            raise FastMRIFormatError(
                f"{path}: ismrmrd_header kspace_encoding_step_1 gives acquired columns "
                f"[{left}, {right}), none of them inside the k-space width [0, {width})")
        warnings.warn(f"{path}: ismrmrd_header (encodedSpace/matrixSize/y = "
                      f"{header.encoding_size[1]}, acquired columns [{left}, {right})) does "
                      f"not match the k-space width {width}; using the acquired columns "
                      f"[{clipped[0]}, {clipped[1]})", stacklevel=3)
        header = dataclasses.replace(header, padding_left=clipped[0], padding_right=clipped[1])
    key = _TARGET_KEY[challenge]
    has_mask = "mask" in hf
    target_key = key if key in hf else None
    if target_key is None and not has_mask:
        raise FastMRIFormatError(f"{path}: missing dataset {key!r} (the {challenge} target of "
                                 "train/val files) and no 'mask' (of test/challenge files)")
    if target_key is not None:
        tgt = _dataset(hf, target_key, path, f"float32 (S, h, w) with S = {n_slices}")
        if tgt.dtype.kind != "f" or tgt.ndim != 3 or tgt.shape[0] != n_slices:
            raise FastMRIFormatError(f"{path}: {target_key!r} must be float32 (S, h, w) with "
                                     f"S = {n_slices}; got {tgt.dtype} {tgt.shape}")
    if has_mask:
        mask = _dataset(hf, "mask", path, f"float/bool (W,) = ({width},)")
        if mask.shape != (width,) or mask.dtype.kind not in "fbiu":
            raise FastMRIFormatError(f"{path}: 'mask' must be float/bool (W,) = ({width},); "
                                     f"got {mask.dtype} {mask.shape}")
    attrs = hf.attrs
    if target_key is not None and "max" not in attrs:
        raise FastMRIFormatError(f"{path}: missing attribute 'max' (the target's maximum)")
    acc = attrs.get("acceleration")
    nlf = attrs.get("num_low_frequency")
    return VolumeInfo(
        path=path, n_slices=n_slices, n_coils=ksp.shape[1] if rank == 4 else 1,
        kspace_shape=tuple(ksp.shape), encoding_size=header.encoding_size,
        recon_size=header.recon_size, padding_left=header.padding_left,
        padding_right=header.padding_right, max_value=float(attrs.get("max", 0.0)),
        acquisition=_as_str(attrs.get("acquisition", "")), target_key=target_key,
        has_mask=has_mask, acceleration=None if acc is None else float(acc),
        num_low_frequency=None if nlf is None else int(nlf))


def _dataset(hf: h5py.File, key: str, path: Path, expected: str) -> h5py.Dataset:
    """``hf[key]``, which must be a dataset (not a group or a link to nowhere)."""
    obj = hf.get(key)
    if not isinstance(obj, h5py.Dataset):
        raise FastMRIFormatError(f"{path}: {key!r} must be a dataset {expected}; "
                                 f"got {type(obj).__name__}")
    return obj


def _header_text(hf: h5py.File, path: Path) -> bytes | str:
    """The XML of ``ismrmrd_header``: a scalar string (fastMRI), or a one-element array."""
    value = _dataset(hf, "ismrmrd_header", path, "(ISMRMRD XML string)")[()]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if not isinstance(value, (bytes, str)):
        raise FastMRIFormatError(f"{path}: 'ismrmrd_header' must hold the ISMRMRD XML as a "
                                 f"string; got {getattr(value, 'dtype', type(value).__name__)}")
    return value


def _check_complete(ds: h5py.Dataset, path: Path) -> None:
    """A contiguous dataset whose bytes run past the end of the file is truncated."""
    offset = ds.id.get_offset()
    if offset is None:
        return
    size = ds.id.get_storage_size()
    if offset + size > path.stat().st_size:
        raise FastMRIReadError(f"{path}: truncated file ('kspace' needs bytes up to "
                               f"{offset + size}, the file has {path.stat().st_size})")


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- samples -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MRISample:
    """One slice, ready for an MRI operator.

    Attributes
    ----------
    kspace : Tensor
        Masked complex64 k-space ``(C, H, W)`` (``(1, H, W)`` for singlecoil).
    mask : Tensor
        float32 mask broadcastable to ``kspace``, ``(1, 1, W)``; zero outside the acquired
        columns ``[padding_left, padding_right)``.
    target : Tensor or None
        float32 ``(h, w)`` RSS (multicoil) / ESC (singlecoil) target cropped to
        ``crop_size``; ``None`` for test files.
    max_value : float
        The volume's target maximum (``attrs['max']``; 0 for test files).
    fname : str
        File name (no folder).
    slice_num : int
        Slice index in the volume.
    coil_maps : Tensor or None
        complex64 ``(C, H, W)`` ESPIRiT maps, or ``None``.
    protocol : Tensor
        float32 ``(P,)`` protocol vector (default ``[acceleration, center_fraction,
        n_coils]``).
    crop_size : (h, w)
        Size of ``target`` and of the final reconstruction.
    num_low_frequencies : int
        ACS width of the mask (columns).
    acquisition : str
        Protocol name from the file (e.g. ``CORPD_FBK``).
    """

    kspace: Tensor
    mask: Tensor
    target: Tensor | None
    max_value: float
    fname: str
    slice_num: int
    coil_maps: Tensor | None
    protocol: Tensor
    crop_size: tuple[int, int]
    num_low_frequencies: int
    acquisition: str


@dataclasses.dataclass(frozen=True)
class MRIBatch:
    """Stacked :class:`MRISample` s: tensors gain a leading ``B`` dim, the rest are lists.

    ``kspace`` ``(B, C, H, W)``, ``mask`` ``(B, 1, 1, W)``, ``target`` ``(B, h, w)`` or ``None``
    when any sample lacks one, ``coil_maps`` ``(B, C, H, W)`` or ``None``, ``protocol``
    ``(B, P)``, ``max_value`` ``(B,)``.
    """

    kspace: Tensor
    mask: Tensor
    target: Tensor | None
    max_value: Tensor
    fname: list[str]
    slice_num: list[int]
    coil_maps: Tensor | None
    protocol: Tensor
    crop_size: list[tuple[int, int]]
    num_low_frequencies: list[int]
    acquisition: list[str]

    def __len__(self) -> int:
        return int(self.kspace.shape[0])


def collate_mri_samples(samples: Sequence[MRISample]) -> MRIBatch:
    """Stack samples of equal shapes into an :class:`MRIBatch` (a DataLoader ``collate_fn``)."""
    if not samples:
        raise ValueError("collate_mri_samples: argument 'samples' must not be empty")
    shapes = {tuple(s.kspace.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate_mri_samples: samples have different k-space shapes {sorted(shapes)}; "
                         f"batch volumes of one size (batch_size=1 or group by shape)")
    out: dict[str, Any] = {}
    for field in dataclasses.fields(MRISample):
        values = [getattr(s, field.name) for s in samples]
        if field.name in ("target", "coil_maps"):
            out[field.name] = None if any(v is None for v in values) else torch.stack(values)
        elif isinstance(values[0], Tensor):
            out[field.name] = torch.stack(values)
        elif field.name == "max_value":
            out[field.name] = torch.tensor(values, dtype=torch.float32)
        else:
            out[field.name] = list(values)
    return MRIBatch(**out)


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A file left out by ``skip_bad_files=True`` and why."""

    path: Path
    reason: str


@dataclasses.dataclass(frozen=True)
class _VolumeMask:
    mask: Tensor  # (1, 1, W) float32, padding zeroed
    num_low_frequencies: int
    acceleration: float
    center_fraction: float


# -- dataset -------------------------------------------------------------------------------
class FastMRISliceDataset(torch.utils.data.Dataset):
    """Slices of official fastMRI HDF5 files, opened lazily, as :class:`MRISample`.

    Parameters
    ----------
    root_or_files : path or sequence of paths
        A folder (its ``*.h5`` files, sorted; hidden files and folders are ignored), one
        file, or a list of files.
    challenge : "multicoil" or "singlecoil"
        Which k-space rank and target (``reconstruction_rss`` / ``reconstruction_esc``).
    mask : mask function, optional
        A :mod:`fedrecon.operators` mask function (``RandomMask``, ``EquispacedFractionMask``,
        ...), seeded per volume by ``tuple(map(ord, fname))`` (fastMRI's seed, so the masks
        equal fastMRI's column for column). ``None``: fully sampled train/val files (a mask of
        ones over the acquired columns). Test files always keep their own mask.
    crop_size : (h, w), optional
        Target crop; default: the file's recon size (e.g. 320 x 320).
    coil_maps : None, "espirit" or CoilMapCache
        Attach ESPIRiT maps of the masked volume (multicoil only), computed once per volume
        and cached on disk (a :class:`CoilMapCache` sets its own folder and settings).
    cache_dir : path, optional
        Folder of the coil-map cache; default ``<root>/.fedrecon-cache`` (for file lists: the
        folder of each file).
    sample_rate, volume_sample_rate : float in (0, 1], optional
        Keep a random fraction of the slices, or of the volumes (not both), like fastMRI.
    protocol : sequence of float or Tensor, optional
        A fixed protocol vector attached to every sample; default per volume:
        ``[acceleration, center_fraction, n_coils]`` (the mask function's nominal values
        when they can be told from the mask, else the realised ones; test files: their
        ``acceleration``/``num_low_frequency`` attributes, else the realised values).
    skip_bad_files : bool
        Skip (log, and list in :attr:`skipped_files`) files that fail validation instead of
        raising.
    seed : int, optional
        Seed of the ``sample_rate``/``volume_sample_rate`` subset (``None``: a random one).
        The masks do not depend on it.
    """

    def __init__(
        self,
        root_or_files: str | os.PathLike | Sequence[str | os.PathLike],
        challenge: Challenge = "multicoil",
        *,
        mask: MaskFunc | None = None,
        crop_size: tuple[int, int] | None = None,
        coil_maps: Literal["espirit"] | CoilMapCache | None = None,
        cache_dir: str | os.PathLike | None = None,
        sample_rate: float | None = None,
        volume_sample_rate: float | None = None,
        protocol: Sequence[float] | Tensor | None = None,
        skip_bad_files: bool = False,
        seed: int | None = None,
    ) -> None:
        if challenge not in _TARGET_KEY:
            raise ValueError(f"argument 'challenge' must be 'multicoil' or 'singlecoil'; "
                             f"got {challenge!r}")
        if sample_rate is not None and volume_sample_rate is not None:
            raise ValueError("set either 'sample_rate' (slices) or 'volume_sample_rate' "
                             "(volumes), not both")
        for name, rate in (("sample_rate", sample_rate),
                           ("volume_sample_rate", volume_sample_rate)):
            if rate is not None and not 0 < rate <= 1:
                raise ValueError(f"argument {name!r} must lie in (0, 1]; got {rate}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ValueError(f"argument 'crop_size' must be (h, w) > 0; got {crop_size}")
        self.challenge = challenge
        self.mask_func = mask
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.protocol = None if protocol is None else self._check_protocol(protocol)
        files, default_cache = _list_files(root_or_files)
        self.coil_map_cache = self._make_cache(coil_maps, cache_dir, default_cache)

        self.volumes: list[VolumeInfo] = []
        self.skipped_files: list[SkippedFile] = []
        for path in files:
            try:
                self.volumes.append(read_volume_info(path, challenge))
            except FastMRIFormatError as err:
                if not skip_bad_files:
                    raise
                logger.warning("skipping %s: %s", path, err)
                self.skipped_files.append(SkippedFile(path, str(err)))
        if not self.volumes:
            raise FileNotFoundError(f"{root_or_files}: no readable fastMRI files "
                                    f"({len(self.skipped_files)} skipped)")

        samples = [(v, s) for v in range(len(self.volumes))
                   for s in range(self.volumes[v].n_slices)]
        rng = random.Random(seed)
        if sample_rate is not None and sample_rate < 1:
            keep = rng.sample(range(len(samples)), round(len(samples) * sample_rate))
            samples = [samples[i] for i in sorted(keep)]
        elif volume_sample_rate is not None and volume_sample_rate < 1:
            n_keep = round(len(self.volumes) * volume_sample_rate)
            keep_vols = set(rng.sample(range(len(self.volumes)), n_keep))
            samples = [s for s in samples if s[0] in keep_vols]
        self.samples: list[tuple[int, int]] = samples
        self._masks: dict[int, _VolumeMask] = {}

    @staticmethod
    def _check_protocol(protocol: Sequence[float] | Tensor) -> Tensor:
        vec = torch.as_tensor(protocol, dtype=torch.float32).clone()
        if vec.ndim != 1:
            raise ValueError(f"argument 'protocol' must be a 1D vector; got shape "
                             f"{tuple(vec.shape)}")
        return vec

    def _make_cache(self, coil_maps: Any, cache_dir: str | os.PathLike | None,
                    default: Path | None) -> CoilMapCache | None:
        if coil_maps is None:
            return None
        if self.challenge != "multicoil":
            raise ValueError("argument 'coil_maps' needs the multicoil challenge")
        if isinstance(coil_maps, CoilMapCache):
            return coil_maps
        if coil_maps != "espirit":
            raise ValueError(f"argument 'coil_maps' must be None, 'espirit' or a CoilMapCache; "
                             f"got {coil_maps!r}")
        return CoilMapCache(cache_dir if cache_dir is not None else default)

    def __len__(self) -> int:
        return len(self.samples)

    def sample_shape(self, index: int) -> tuple[tuple[int, ...], tuple[int, int]]:
        """``((C, H, W), crop)`` of sample ``index``, from the index (no read): what must
        agree for samples to share a batch (:func:`collate_mri_samples`)."""
        info = self.volumes[self.samples[index][0]]
        crop = self.crop_size or (info.recon_size[0], info.recon_size[1])
        return (info.n_coils, *info.kspace_shape[-2:]), crop

    def shape_batches(self, batch_size: int) -> list[list[int]]:
        """All sample indices in order, cut into batches of at most ``batch_size`` that
        never mix k-space shapes or crops (fastMRI sites mix coil counts and matrix widths
        from volume to volume); a ``DataLoader`` ``batch_sampler`` for evaluation."""
        batches: list[list[int]] = []
        last = None
        for i in range(len(self)):
            shape = self.sample_shape(i)
            if not batches or shape != last or len(batches[-1]) == batch_size:
                batches.append([])
            batches[-1].append(i)
            last = shape
        return batches

    # -- masks ---------------------------------------------------------------------------
    def volume_mask(self, volume: int) -> _VolumeMask:
        """The mask of volume index ``volume`` (identical for all its slices), memoised."""
        cached = self._masks.get(volume)
        if cached is None:
            cached = self._make_volume_mask(self.volumes[volume])
            self._masks[volume] = cached
        return cached

    def _make_volume_mask(self, info: VolumeInfo) -> _VolumeMask:
        width = info.kspace_shape[-1]
        p0, p1 = info.padding_left, info.padding_right
        if info.has_mask:
            with h5py.File(info.path, "r") as hf:
                col = np.asarray(hf["mask"][()], dtype=np.float32)
            mask = torch.from_numpy(col).reshape(1, 1, width).clone()
            mask[..., :p0] = 0
            mask[..., p1:] = 0
            n_low = info.num_low_frequency if info.num_low_frequency is not None \
                else acs_width(mask)
            acc = info.acceleration if info.acceleration is not None \
                else _realised_acceleration(mask, p0, p1)
            return _VolumeMask(mask, int(n_low), float(acc), n_low / width)
        if self.mask_func is None:
            mask = torch.zeros(1, 1, width)
            mask[..., p0:p1] = 1
            return _VolumeMask(mask, p1 - p0, 1.0, 1.0)
        shape = (info.n_coils, *info.kspace_shape[-2:])
        seed = tuple(map(ord, info.path.name))
        mask, n_low = self.mask_func(shape, seed=seed)
        mask = mask.to(torch.float32).reshape(1, *mask.shape[-2:]).clone()
        mask[..., :p0] = 0
        mask[..., p1:] = 0
        acc, frac = _nominal_acceleration(self.mask_func, width, int(n_low))
        if acc is None:
            acc, frac = _realised_acceleration(mask, p0, p1), n_low / width
        return _VolumeMask(mask, int(n_low), acc, frac)

    # -- items ---------------------------------------------------------------------------
    def __getitem__(self, index: int) -> MRISample:
        vol, slice_num = self.samples[index]
        info = self.volumes[vol]
        vmask = self.volume_mask(vol)
        try:
            with h5py.File(info.path, "r") as hf:
                ksp = hf["kspace"][slice_num]
                target = None if info.target_key is None else hf[info.target_key][slice_num]
        except (OSError, KeyError) as err:
            raise FastMRIReadError(f"{info.path}: cannot read slice {slice_num} "
                                   f"({err})") from err
        ksp = np.asarray(ksp, dtype=np.complex64)
        if ksp.ndim == 2:
            ksp = ksp[None]
        mask_np = vmask.mask.numpy()
        if not info.has_mask:  # test files keep their (already undersampled) k-space
            np.multiply(ksp, mask_np, out=ksp)
        crop = self.crop_size or (info.recon_size[0], info.recon_size[1])
        target_t = None
        if target is not None:
            if crop[0] > target.shape[-2] or crop[1] > target.shape[-1]:
                raise ValueError(f"{info.path}: crop_size {crop} exceeds the stored target "
                                 f"{target.shape[-2:]}")
            target_t = torch.from_numpy(
                np.ascontiguousarray(center_crop(target, crop), dtype=np.float32))
        maps = None
        if self.coil_map_cache is not None:
            maps = self.coil_map_cache.get(info.path, slice_num, vmask.mask,
                                           vmask.num_low_frequencies)
        protocol = self.protocol.clone() if self.protocol is not None else torch.tensor(
            [vmask.acceleration, vmask.center_fraction, float(info.n_coils)],
            dtype=torch.float32)
        return MRISample(
            kspace=torch.from_numpy(ksp), mask=vmask.mask.clone(), target=target_t,
            max_value=info.max_value, fname=info.path.name, slice_num=slice_num,
            coil_maps=maps, protocol=protocol, crop_size=crop,
            num_low_frequencies=vmask.num_low_frequencies, acquisition=info.acquisition)


def _list_files(root_or_files: str | os.PathLike | Sequence[str | os.PathLike]
                ) -> tuple[list[Path], Path | None]:
    """The files to index and the default cache folder (``<root>/.fedrecon-cache``)."""
    if isinstance(root_or_files, (str, os.PathLike)):
        root = Path(root_or_files)
        if root.is_dir():
            files = sorted(p for p in root.iterdir()
                           if p.suffix == ".h5" and p.is_file() and not p.name.startswith("."))
            if not files:
                raise FileNotFoundError(f"{root}: folder has no fastMRI .h5 files")
            return files, root / ".fedrecon-cache"
        if not root.is_file():
            raise FileNotFoundError(f"{root}: no such file or folder")
        return [root], None
    files = [Path(p) for p in root_or_files]
    if not files:
        raise FileNotFoundError("argument 'root_or_files' is an empty list of files")
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    return files, None


def _realised_acceleration(mask: Tensor, p0: int, p1: int) -> float:
    sampled = float(mask[..., p0:p1].sum())
    return (p1 - p0) / sampled if sampled > 0 else float("inf")


def _nominal_acceleration(mask_func: Any, width: int,
                          n_low: int) -> tuple[float | None, float]:
    """The configured ``(acceleration, center_fraction)`` that produced ``n_low`` ACS columns,
    when the mask function's configuration tells it unambiguously."""
    fractions = getattr(mask_func, "center_fractions", None)
    accs = getattr(mask_func, "accelerations", None)
    if fractions is None or accs is None:
        acc = getattr(mask_func, "acceleration", None)  # 2D masks
        return (None if acc is None else float(acc)), n_low / width
    if getattr(mask_func, "allow_any_combination", False):
        pairs = [(f, a) for f in fractions for a in accs]
    else:
        pairs = list(zip(fractions, accs))
    matches = {(float(f), float(a)) for f, a in pairs if round(width * f) == n_low}
    if len({a for _, a in matches}) == 1:
        frac, acc = min(matches)
        return acc, frac
    if len(set(map(float, accs))) == 1:
        return float(accs[0]), n_low / width
    return None, n_low / width
