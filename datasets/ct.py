"""CT data: a site's acquisition, the HDF5 CT volume layout, and a slice dataset that
simulates the site's scan of every stored slice on the fly.

HDF5 CT volume layout (one file per volume, ``*.h5`` or ``*.hdf5``)
---------------------------------------------------------------------
``image``
    Dataset ``(S, H, W)`` float32, one chunk per slice; row 0 is the top of the slice
    (the ``y``-up convention of :mod:`fedrecon.operators.ct`).
root attributes
    ``units``: ``"HU"`` (Hounsfield units) or ``"attenuation_per_mm"`` (linear attenuation,
    1/mm). ``pixel_spacing``: float64 ``(2,)``, (row, column) spacing in mm.
    ``slice_positions`` (optional): float64 ``(S,)``, each slice's position along the slice
    normal in mm, ascending. ``patient_id``: str (splits are drawn per patient, so a
    patient's volumes never straddle train and test). ``layout``: ``"fedrecon-ct-volume/1"``.

:func:`write_ct_volume` writes a complete file or nothing (temporary file + ``os.replace``).

What a sample is
----------------
A slice is converted to linear attenuation mu in 1/mm (``mu = mu_water (1 + HU/1000)``,
negatives clipped to 0) and resized (antialiased bilinear) to the dataset's grid. The grid
is taken to fill the acquisition's field of view ``image_size * pixel_spacing``: the file's
own pixel spacing is kept as metadata but does not rescale the physics, so every slice of a
site shares one operator and one cached system matrix. The clean sinogram is the
acquisition's operator applied to mu (dimensionless line integrals); with ``photons`` set,
:func:`~fedrecon.operators.simulate_low_dose` adds Poisson and electronic noise with a seed
derived from (dataset seed, file name, slice index). ``CTSample.target`` stays in physical
units (1/mm), so ``A(target)`` is the clean measurement and a data-consistency step needs no
rescaling; normalizing for a network (e.g. dividing by :data:`MU_WATER_PER_MM`) is the
model's business.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import operator as _operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from fedrecon.operators import FILTERS, FanBeam2D, ParallelBeam2D, fbp, simulate_low_dose
from torch import Tensor

from .fastmri_write import temp_file_beside

__all__ = [
    "CT_UNITS",
    "GEOMETRY_CODES",
    "MU_WATER_PER_MM",
    "PROTOCOL_FIELDS",
    "SPLITS",
    "CTAcquisition",
    "CTBatch",
    "CTFileError",
    "CTSample",
    "CTSliceDataset",
    "CTVolume",
    "CTVolumeInfo",
    "attenuation_to_hu",
    "collate_ct_samples",
    "hu_to_attenuation",
    "patient_split",
    "read_ct_volume",
    "read_ct_volume_info",
    "slice_seed",
    "write_ct_volume",
]

log = logging.getLogger(__name__)

# Linear attenuation of water at ~70 keV, the effective energy of a 120 kVp spectrum.
# NIST XCOM / Hubbell & Seltzer, "Tables of X-Ray Mass Attenuation Coefficients" (NIST SRD
# 126), liquid water: mu/rho = 0.2059 cm^2/g at 60 keV, 0.1837 cm^2/g at 80 keV; log-log
# interpolation gives ~0.194 cm^-1 at 70 keV (density 1 g/cm^3), i.e. 0.019 mm^-1. 0.0192 is
# the value used by common low-dose CT simulations; the spectrum's exact energy moves it +-2%.
MU_WATER_PER_MM = 0.0192

GEOMETRY_CODES: dict[str, float] = {"parallel": 0.0, "fan": 1.0}
PROTOCOL_FIELDS = ("n_views", "det_count", "det_spacing", "source_distance",
                   "detector_distance", "log10_photons", "angle_range", "geometry_code")
CT_UNITS = ("HU", "attenuation_per_mm")
LAYOUT = "fedrecon-ct-volume/1"
SPLITS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


class CTFileError(ValueError):
    """A CT volume file is unreadable or does not follow the layout (the message names it)."""


# ---------------------------------------------------------------------------------------
# Acquisition
# ---------------------------------------------------------------------------------------
def _as_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be an integer; got {value!r}")
    try:
        return _operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}.{name} must be an integer; got {value!r}") from None


def _as_float(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{owner}.{name} must be a number; got {value!r}")
    return float(value)


def _as_size(owner: str, name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner}.{name} must be N or (H, W); got {value!r}")
        size = (_as_int(owner, name, value[0]), _as_int(owner, name, value[1]))
    else:
        n = _as_int(owner, name, value)
        size = (n, n)
    if min(size) < 1:
        raise ValueError(f"{owner}.{name} must be positive; got {value!r}")
    return size


@dataclass(frozen=True)
class CTAcquisition:
    """One site's CT protocol: geometry, views, detector, dose and reconstruction grid.

    Lengths are in mm. ``angle_range`` (radians) defaults to pi for parallel beam and
    2 pi for fan beam; the ``n_views`` angles are ``k * angle_range / n_views`` (sparse view:
    few views; limited angle: a smaller range). ``det_count=None`` resolves to a detector
    that covers the field of view. ``photons`` is the blank-scan count per bin I0 (``None``:
    noiseless); ``electronic_noise`` is the read-out standard deviation in counts.
    ``image_size * pixel_spacing`` is the field of view. Invalid values raise at
    construction, naming the field.
    """

    geometry: str = "parallel"
    n_views: int = 180
    angle_range: float | None = None
    det_count: int | None = None
    det_spacing: float = 1.0
    source_distance: float | None = None
    detector_distance: float | None = None
    photons: float | None = None
    electronic_noise: float = 0.0
    image_size: tuple[int, int] | int = (256, 256)
    pixel_spacing: float = 1.0

    def __post_init__(self) -> None:
        own = "CTAcquisition"
        set_ = functools.partial(object.__setattr__, self)
        if self.geometry not in GEOMETRY_CODES:
            raise ValueError(f"{own}.geometry must be one of {tuple(GEOMETRY_CODES)}; "
                             f"got {self.geometry!r}")
        set_("n_views", _as_int(own, "n_views", self.n_views))
        set_("image_size", _as_size(own, "image_size", self.image_size))
        for name in ("det_spacing", "electronic_noise", "pixel_spacing"):
            set_(name, _as_float(own, name, getattr(self, name)))
        for name in ("angle_range", "source_distance", "detector_distance", "photons"):
            if getattr(self, name) is not None:
                set_(name, _as_float(own, name, getattr(self, name)))
        if self.det_count is not None:
            set_("det_count", _as_int(own, "det_count", self.det_count))
        if self.angle_range is None:
            set_("angle_range", math.pi if self.geometry == "parallel" else 2 * math.pi)
        self.validate()
        if self.det_count is None:  # the operator's own default: cover the field of view
            set_("det_count", self._build_operator(self.image_size, [0.0], None).det_count)

    def validate(self) -> CTAcquisition:
        """Raise ``ValueError`` naming the first invalid field; return ``self``."""
        own = "CTAcquisition"

        def positive(name: str) -> None:
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{own}.{name} must be a finite positive number; got {v!r}")

        if self.n_views < 1:
            raise ValueError(f"{own}.n_views must be >= 1; got {self.n_views}")
        positive("angle_range")
        if self.angle_range > 2 * math.pi + 1e-9:
            raise ValueError(f"{own}.angle_range must be <= 2 pi (radians); got {self.angle_range}")
        if self.det_count is not None and self.det_count < 1:
            raise ValueError(f"{own}.det_count must be >= 1; got {self.det_count}")
        positive("det_spacing")
        positive("pixel_spacing")
        if self.geometry == "parallel":
            for name in ("source_distance", "detector_distance"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{own}.{name} applies to geometry 'fan' only; "
                                     f"got {getattr(self, name)} with geometry 'parallel'")
        else:
            for name in ("source_distance", "detector_distance"):
                if getattr(self, name) is None:
                    raise ValueError(f"{own}.{name} is required for geometry 'fan' (mm)")
            radius = 0.5 * math.hypot(*self.image_size) * self.pixel_spacing
            if not (math.isfinite(self.source_distance) and self.source_distance > radius):
                raise ValueError(f"{own}.source_distance must exceed the field of view's "
                                 f"half-diagonal {radius:.4g} mm; got {self.source_distance}")
            if not (math.isfinite(self.detector_distance) and self.detector_distance >= 0):
                raise ValueError(f"{own}.detector_distance must be finite and >= 0; "
                                 f"got {self.detector_distance}")
        if self.det_count is not None:
            self._check_detector_covers_field_of_view()
        if self.photons is not None:
            positive("photons")
        if not (math.isfinite(self.electronic_noise) and self.electronic_noise >= 0):
            raise ValueError(f"{own}.electronic_noise must be >= 0; got {self.electronic_noise}")
        if self.electronic_noise > 0 and self.photons is None:
            raise ValueError(f"{own}.electronic_noise needs photons (a noiseless acquisition "
                             f"has no read-out noise); got {self.electronic_noise} with "
                             f"photons=None")
        return self

    def _check_detector_covers_field_of_view(self) -> None:
        """An explicit ``det_count`` must see the whole disc inscribed in the field of view
        (every ray through it hits a bin), else every projection is silently truncated."""
        own = "CTAcquisition"
        radius = 0.5 * min(self.image_size) * self.pixel_spacing
        if self.geometry == "parallel":
            need = 2.0 * radius  # detector width at the isocentre
        else:  # the fan's edge rays must pass the centre at >= radius
            sdd = self.source_distance + self.detector_distance
            need = 2.0 * sdd * math.tan(math.asin(radius / self.source_distance))
        width = self.det_count * self.det_spacing
        if width < need * (1.0 - 1e-9):
            minimum = math.ceil(need / self.det_spacing * (1.0 - 1e-9))
            raise ValueError(f"{own}.det_count {self.det_count} x det_spacing {self.det_spacing:g} "
                             f"mm ({width:g} mm) does not cover the field of view "
                             f"(image_size x pixel_spacing, {2 * radius:g} mm wide; "
                             f"{need:g} mm on the detector): use det_count >= {minimum} or "
                             f"leave det_count out")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CTAcquisition:
        """Build from a config table; unknown keys are an error naming the key."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in config:
            if key not in names:
                raise ValueError(f"CTAcquisition: unknown key {key!r}; expected one of {names}")
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    def angles(self) -> Tensor:
        """The ``(n_views,)`` view angles in radians, float64: ``k * angle_range / n_views``."""
        return torch.arange(self.n_views, dtype=torch.float64) * (self.angle_range / self.n_views)

    @property
    def field_of_view(self) -> tuple[float, float]:
        """``(height, width)`` of the reconstruction grid in mm."""
        return (self.image_size[0] * self.pixel_spacing, self.image_size[1] * self.pixel_spacing)

    def pixel_spacing_for(self, image_size: int | Sequence[int]) -> float:
        """Pixel spacing (mm) of a grid of ``image_size`` over the same field of view."""
        h, w = _as_size("make_operator", "image_size", image_size)
        sy = self.field_of_view[0] / h
        sx = self.field_of_view[1] / w
        if not math.isclose(sy, sx, rel_tol=1e-6):
            raise ValueError(f"argument 'image_size' {(h, w)} must keep the aspect ratio of "
                             f"CTAcquisition.image_size {self.image_size} (square pixels)")
        return sx

    def make_operator(self, image_size: int | Sequence[int] | None = None
                      ) -> ParallelBeam2D | FanBeam2D:
        """The site's projector on a grid of ``image_size`` (default: the acquisition's).

        Another ``image_size`` keeps the field of view (the pixel spacing scales). The
        instance is cached and shared by every caller with an equal acquisition and size:
        do not modify it in place (``copy.deepcopy`` it first).
        """
        size = self.image_size if image_size is None else _as_size("make_operator", "image_size",
                                                                   image_size)
        return _cached_operator(self, size)

    def _build_operator(self, size: tuple[int, int], angles: Sequence[float] | Tensor,
                        det_count: int | None) -> ParallelBeam2D | FanBeam2D:
        ps = self.pixel_spacing_for(size)
        if self.geometry == "parallel":
            return ParallelBeam2D(size, angles, det_count, self.det_spacing, pixel_spacing=ps)
        return FanBeam2D(size, angles, det_count, self.det_spacing, pixel_spacing=ps,
                         source_distance=self.source_distance,
                         detector_distance=self.detector_distance)

    def uses_short_scan(self) -> bool:
        """Fan beam over at least pi + fan angle but less than 2 pi (FBP needs Parker weights)."""
        if self.geometry != "fan" or self.angle_range >= 2 * math.pi - 1e-9:
            return False
        half_det = 0.5 * (self.det_count - 1) * self.det_spacing
        fan_angle = 2 * math.atan(half_det / (self.source_distance + self.detector_distance))
        return self.angle_range >= math.pi + fan_angle

    def protocol_vector(self) -> Tensor:
        """float32 ``(8,)`` in the order of :data:`PROTOCOL_FIELDS`, raw physical units.

        Distances are 0 for parallel beam; ``log10_photons`` is 0 for a noiseless acquisition.
        """
        return torch.tensor([
            self.n_views, self.det_count, self.det_spacing,
            self.source_distance or 0.0, self.detector_distance or 0.0,
            math.log10(self.photons) if self.photons is not None else 0.0,
            self.angle_range, GEOMETRY_CODES[self.geometry],
        ], dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _cached_operator(acq: CTAcquisition, size: tuple[int, int]) -> ParallelBeam2D | FanBeam2D:
    return acq._build_operator(size, acq.angles(), acq.det_count)


# ---------------------------------------------------------------------------------------
# Units and the HDF5 layout
# ---------------------------------------------------------------------------------------
def hu_to_attenuation(hu: Tensor | np.ndarray,
                      mu_water: float = MU_WATER_PER_MM) -> Tensor | np.ndarray:
    """Linear attenuation (1/mm) ``mu_water * (1 + HU/1000)``, negatives clipped to 0."""
    if isinstance(hu, Tensor):
        return (mu_water * (1.0 + hu / 1000.0)).clamp_min(0.0)
    hu = np.asarray(hu)
    return np.maximum(mu_water * (1.0 + hu / 1000.0), 0.0).astype(np.result_type(hu, np.float32))


def attenuation_to_hu(mu: Tensor | np.ndarray,
                      mu_water: float = MU_WATER_PER_MM) -> Tensor | np.ndarray:
    """Hounsfield units ``1000 * (mu / mu_water - 1)``."""
    return 1000.0 * (mu / mu_water - 1.0)


def _spacing_pair(name: str, value: Any) -> tuple[float, float]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"argument '{name}' must be a positive spacing or (row, col) pair in mm; "
                         f"got {value!r}")
    return float(arr[0]), float(arr[1])


@dataclass(frozen=True)
class CTVolumeInfo:
    """Metadata of one volume file (the dataset's index; no pixel data)."""

    path: Path
    n_slices: int
    shape: tuple[int, int]
    units: str
    pixel_spacing: tuple[float, float]
    patient_id: str


@dataclass(frozen=True)
class CTVolume:
    """A whole volume as stored: ``image`` ``(S, H, W)`` float32 in ``units``."""

    image: np.ndarray
    units: str
    pixel_spacing: tuple[float, float]
    slice_positions: np.ndarray | None
    patient_id: str


def write_ct_volume(path: str | Path, image: np.ndarray | Tensor, *, units: str,
                    pixel_spacing: float | Sequence[float],
                    slice_positions: Sequence[float] | np.ndarray | None = None,
                    patient_id: str | None = None, overwrite: bool = False) -> Path:
    """Write ``image`` ``(S, H, W)`` as one CT volume file (layout in the module docstring).

    The file appears complete or not at all (temporary file in the same folder, then
    ``os.replace``). ``patient_id`` defaults to the file's stem.
    """
    path = Path(path)
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"write_ct_volume: argument 'image' must have shape (S, H, W) with S, H, "
                         f"W >= 1; got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("write_ct_volume: argument 'image' must contain only finite values")
    if units not in CT_UNITS:
        raise ValueError(f"write_ct_volume: argument 'units' must be one of {CT_UNITS}; "
                         f"got {units!r}")
    spacing = _spacing_pair("pixel_spacing", pixel_spacing)
    positions = None
    if slice_positions is not None:
        positions = np.asarray(slice_positions, dtype=np.float64)
        if positions.shape != (arr.shape[0],) or not np.all(np.isfinite(positions)):
            raise ValueError(f"write_ct_volume: argument 'slice_positions' must be "
                             f"({arr.shape[0]},) finite values in mm; got shape {positions.shape}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"write_ct_volume: '{path}' exists; pass overwrite=True to "
                              f"replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)  # mode 0666 less the umask, not mkstemp's 0600
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=arr, chunks=(1, *arr.shape[1:]),
                             compression="gzip", compression_opts=1, shuffle=True)
            f.attrs["units"] = units
            f.attrs["pixel_spacing"] = np.asarray(spacing, dtype=np.float64)
            if positions is not None:
                f.attrs["slice_positions"] = positions
            f.attrs["patient_id"] = patient_id if patient_id is not None else path.stem
            f.attrs["layout"] = LAYOUT
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_info(f: h5py.File, path: Path) -> CTVolumeInfo:
    expected = "a CT volume file with dataset 'image' (S, H, W) and attrs 'units', 'pixel_spacing'"
    if "image" not in f or not isinstance(f["image"], h5py.Dataset):
        raise CTFileError(f"'{path}': missing key 'image'; expected {expected}")
    shape = f["image"].shape
    if f["image"].dtype.kind not in "fiu":  # complex, strings, ...: not CT numbers
        raise CTFileError(f"'{path}': dataset 'image' has dtype {f['image'].dtype}; expected "
                          f"real numbers (float32, or integer HU as stored by DICOM)")
    if len(shape) != 3 or 0 in shape:
        raise CTFileError(f"'{path}': dataset 'image' has shape {shape}; expected rank 3 (S, H, W) "
                          f"with S, H, W >= 1")
    for key in ("units", "pixel_spacing"):
        if key not in f.attrs:
            raise CTFileError(f"'{path}': missing attribute {key!r}; expected {expected}")
    units = _attr_str(f.attrs["units"])
    if units not in CT_UNITS:
        raise CTFileError(f"'{path}': attribute 'units' is {units!r}; expected one of {CT_UNITS}")
    try:
        spacing = _spacing_pair("pixel_spacing", f.attrs["pixel_spacing"])
    except ValueError as err:
        raise CTFileError(f"'{path}': attribute {err}") from None
    pid = _attr_str(f.attrs["patient_id"]) if "patient_id" in f.attrs else path.stem
    return CTVolumeInfo(path, shape[0], (shape[1], shape[2]), units, spacing, pid)


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise CTFileError(f"'{path}': cannot be read as HDF5 ({err}); expected a CT volume file "
                          f"with dataset 'image' (S, H, W)") from err


def read_ct_volume_info(path: str | Path) -> CTVolumeInfo:
    """Check one file against the layout and return its metadata (no pixel data is read)."""
    path = Path(path)
    with _open(path) as f:
        return _read_info(f, path)


def read_ct_volume(path: str | Path) -> CTVolume:
    """Read a whole volume file."""
    path = Path(path)
    with _open(path) as f:
        info = _read_info(f, path)
        image = np.asarray(f["image"][()], dtype=np.float32)
        pos = f.attrs.get("slice_positions")
    return CTVolume(image, info.units, info.pixel_spacing,
                    None if pos is None else np.asarray(pos, dtype=np.float64), info.patient_id)


# ---------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------
def slice_seed(seed: int, fname: str, slice_num: int) -> int:
    """A 63-bit noise seed for one slice: stable across runs, machines and file moves."""
    digest = hashlib.sha256(f"{int(seed)}\x00{fname}\x00{int(slice_num)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def patient_split(patient_id: str) -> str:
    """The split (``"train"`` 80 %, ``"val"`` 10 %, ``"test"`` 10 %) of a patient, by hash."""
    u = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "little") / 2.0**64
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= u < hi)


@dataclass(frozen=True)
class CTSample:
    """One simulated slice.

    ``sinogram`` ``(n_views, det_count)`` float32 line integrals (noisy when the acquisition
    has ``photons``); ``target`` ``(H, W)`` float32 linear attenuation in 1/mm; ``fbp``
    ``(H, W)`` float32 or ``None``; ``protocol`` ``(8,)`` float32 (:data:`PROTOCOL_FIELDS`).
    """

    sinogram: Tensor
    target: Tensor
    fbp: Tensor | None
    protocol: Tensor
    fname: str
    slice_num: int
    acquisition: CTAcquisition


@dataclass(frozen=True)
class CTBatch:
    """Stacked :class:`CTSample` s: ``(B, n_views, det_count)``, ``(B, H, W)``, ``(B, 8)``."""

    sinogram: Tensor
    target: Tensor
    fbp: Tensor | None
    protocol: Tensor
    fname: list[str]
    slice_num: Tensor
    acquisition: CTAcquisition


def collate_ct_samples(samples: Sequence[CTSample]) -> CTBatch:
    """``collate_fn`` for a ``DataLoader`` over one site (one acquisition, one operator)."""
    if not samples:
        raise ValueError("collate_ct_samples: argument 'samples' is empty")
    acq = samples[0].acquisition
    for i, s in enumerate(samples):
        if s.acquisition != acq:
            raise ValueError(f"collate_ct_samples: sample {i} ({s.fname}, slice {s.slice_num}) has "
                             f"another acquisition than sample 0; batch one site at a time")
    has_fbp = [s.fbp is not None for s in samples]
    if any(has_fbp) and not all(has_fbp):
        raise ValueError("collate_ct_samples: some samples have 'fbp' and others do not")
    return CTBatch(
        sinogram=torch.stack([s.sinogram for s in samples]),
        target=torch.stack([s.target for s in samples]),
        fbp=torch.stack([s.fbp for s in samples]) if all(has_fbp) else None,
        protocol=torch.stack([s.protocol for s in samples]),
        fname=[s.fname for s in samples],
        slice_num=torch.tensor([s.slice_num for s in samples]),
        acquisition=acq,
    )


def _list_files(root_or_files: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(root_or_files, (str, os.PathLike)):
        root = Path(root_or_files)
        if root.is_dir():
            files = sorted(p for p in root.iterdir()
                           if p.suffix in (".h5", ".hdf5") and not p.name.startswith(".")
                           and p.is_file())
            if not files:
                raise FileNotFoundError(f"CTSliceDataset: folder '{root}' has no .h5/.hdf5 CT "
                                        f"volume files")
            return files
        files = [root]
    else:
        files = [Path(p) for p in root_or_files]
        if not files:
            raise ValueError("CTSliceDataset: argument 'root_or_files' is an empty list of files")
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"CTSliceDataset: '{p}' does not exist (expected a folder of "
                                    f"CT volume files or a file)")
    return files


class CTSliceDataset(torch.utils.data.Dataset):
    """Slices of CT volume files, each simulated through one site's acquisition.

    Parameters
    ----------
    root_or_files
        A folder of ``*.h5`` / ``*.hdf5`` volume files, one file, or a list of files.
    acquisition
        The site's :class:`CTAcquisition` (geometry, views, dose, grid).
    seed
        Noise seed; slice ``s`` of file ``f`` always gets the noise of ``(seed, f.name, s)``.
    split
        ``None`` (every file) or ``"train"`` / ``"val"`` / ``"test"``: files chosen by a
        hash of their ``patient_id`` (:func:`patient_split`).
    skip_bad_files
        Skip unreadable or malformed files (logged, listed in ``skipped_files``) instead of
        raising.
    image_size
        Grid of targets and operator (default: the acquisition's); the field of view is kept.
    return_fbp
        Also return the filtered backprojection of the sinogram (``fbp_filter`` window).
    """

    def __init__(self, root_or_files: str | Path | Sequence[str | Path], acquisition: CTAcquisition,
                 *, seed: int = 0, split: str | None = None, skip_bad_files: bool = False,
                 image_size: int | Sequence[int] | None = None, return_fbp: bool = False,
                 fbp_filter: str = "ramp") -> None:
        if not isinstance(acquisition, CTAcquisition):
            raise TypeError(f"CTSliceDataset: argument 'acquisition' must be a CTAcquisition; "
                            f"got {type(acquisition).__name__}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"CTSliceDataset: argument 'split' must be None or one of "
                             f"{tuple(SPLITS)}; got {split!r}")
        self.acquisition = acquisition
        self.seed = int(seed)
        self.split = split
        self.return_fbp = bool(return_fbp)
        ok = isinstance(fbp_filter, str) and fbp_filter.lower().replace("_", "-") in (
            *FILTERS, "ram-lak", "ramlak")
        if not ok:
            raise ValueError(f"CTSliceDataset: argument 'fbp_filter' must be one of {FILTERS} "
                             f"(or 'ram-lak'); got {fbp_filter!r}")
        self.fbp_filter = fbp_filter
        self.operator = acquisition.make_operator(image_size)
        self.image_size: tuple[int, int] = self.operator.image_size
        self.protocol = acquisition.protocol_vector()
        self.skipped_files: list[Path] = []
        self.skip_reasons: dict[Path, str] = {}
        volumes: list[CTVolumeInfo] = []
        files = _list_files(root_or_files)
        for path in files:
            try:
                volumes.append(read_ct_volume_info(path))
            except CTFileError as err:
                if not skip_bad_files:
                    raise
                log.warning("CTSliceDataset: skipping %s", err)
                self.skipped_files.append(path)
                self.skip_reasons[path] = str(err)
        if not volumes:
            raise CTFileError(f"CTSliceDataset: none of the {len(files)} files is a readable CT "
                              f"volume; skipped: {[str(p) for p in self.skipped_files]}")
        if split is not None:
            volumes = [v for v in volumes if patient_split(v.patient_id) == split]
            if not volumes:
                raise ValueError(f"CTSliceDataset: split {split!r} selects no volume among "
                                 f"{len(files)} files (too few patients for an 80/10/10 split)")
        self.volumes: list[CTVolumeInfo] = volumes
        self._index = [(v, s) for v in volumes for s in range(v.n_slices)]

    def __len__(self) -> int:
        return len(self._index)

    def _read_slice(self, vol: CTVolumeInfo, s: int) -> Tensor:
        with _open(vol.path) as f:
            try:
                data = f["image"][s]
            except (KeyError, OSError, ValueError) as err:
                raise CTFileError(f"'{vol.path}': cannot read slice {s} of dataset 'image' "
                                  f"(indexed as {vol.n_slices} slices of {vol.shape}): {err}"
                                  ) from err
        img = torch.from_numpy(np.asarray(data, dtype=np.float32))
        if vol.units == "HU":
            img = hu_to_attenuation(img)
        else:
            img = img.clamp_min(0.0)
        if tuple(img.shape) != self.image_size:
            img = F.interpolate(img[None, None], size=self.image_size, mode="bilinear",
                                align_corners=False, antialias=True)[0, 0]
        return img.contiguous()

    def __getitem__(self, index: int) -> CTSample:
        vol, s = self._index[range(len(self._index))[index]]
        target = self._read_slice(vol, s)
        with torch.no_grad():
            sino = self.operator(target)
            acq = self.acquisition
            if acq.photons is not None:
                sino = simulate_low_dose(sino, acq.photons, acq.electronic_noise,
                                         seed=slice_seed(self.seed, vol.path.name, s))
            rec = None
            if self.return_fbp:
                rec = fbp(self.operator, sino, self.fbp_filter, parker=acq.uses_short_scan())
        return CTSample(sinogram=sino, target=target, fbp=rec, protocol=self.protocol.clone(),
                        fname=vol.path.name, slice_num=s, acquisition=self.acquisition)

    def __repr__(self) -> str:
        return (f"CTSliceDataset({len(self.volumes)} volumes, {len(self)} slices, "
                f"image_size={self.image_size}, {self.acquisition})")
