"""Heterogeneous federated sites: what a site is (:class:`SiteSpec`, its data source and its
acquisition) and the sites file (TOML). Simulation lives in :mod:`.site_simulation`, the
non-IID recipes in :mod:`.recipes`, strict parsing in :mod:`.config`.

A :class:`SiteSpec` says what a site has: its modality, where its data comes from (a folder
of fastMRI files, or ``synthetic`` volumes made by :func:`.synthetic.make_synthetic_fastmri`),
how the volumes split into train / val / test, and its acquisition (:class:`MRIAcquisition`,
or the CT work's ``CTAcquisition``). :func:`simulate_sites` turns specs into datasets whose
samples carry the site's protocol vector, and checks that no volume is in two splits or two
sites.

A sites file (TOML)::

    [[sites]]
    name = "site_a"
    modality = "mri"
    split = [0.6, 0.2, 0.2]
    [sites.data]
    kind = "synthetic"
    n_volumes = 6
    sequence = "AXT2"
    [sites.acquisition]
    mask_type = "equispaced_fraction"
    acceleration = 8.0
    n_coils = 4
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fedrecon.operators import (
    CartesianMask,
    EquispacedFractionMask,
    EquispacedMask,
    MagicFractionMask,
    MagicMask,
    PoissonDiscMask,
    RandomMask,
    VariableDensityMask2D,
)

from .anatomy import ANATOMY_SOURCES, CONTRASTS
from .config import ConfigError, dataclass_from_dict, dataclass_to_dict, toml_value

__all__ = [
    "MASK_TYPES",
    "ConfigError",
    "DataSource",
    "MRIAcquisition",
    "SiteSpec",
    "check_acquisition_fits",
    "check_unique_names",
    "ct_acquisition_class",
    "dump_site_specs",
    "load_site_specs",
    "site_specs_to_toml",
]

SPLITS = ("train", "val", "test")


# -- MRI acquisition ---------------------------------------------------------------------------
MaskFunction = CartesianMask | VariableDensityMask2D | PoissonDiscMask

# mask type -> factory(acquisition, seed); the order fixes the protocol vector's one-hot
MASK_TYPES: dict[str, Callable[[MRIAcquisition, int | None], MaskFunction]] = {
    "random": lambda a, s: RandomMask([a.center_fraction], [a.acceleration], seed=s),
    "equispaced": lambda a, s: EquispacedMask([a.center_fraction], [a.acceleration], seed=s),
    "equispaced_fraction": lambda a, s: EquispacedFractionMask(
        [a.center_fraction], [a.acceleration], seed=s),
    "magic": lambda a, s: MagicMask([a.center_fraction], [a.acceleration], seed=s),
    "magic_fraction": lambda a, s: MagicFractionMask(
        [a.center_fraction], [a.acceleration], seed=s),
    "variable_density": lambda a, s: VariableDensityMask2D(a.acceleration, a.calib_size, seed=s),
    "poisson": lambda a, s: PoissonDiscMask(a.acceleration, a.calib_size, seed=s),
}
_INTEGER_ACCELERATION = ("equispaced", "magic")


@dataclass(frozen=True)
class MRIAcquisition:
    """How an MRI site acquires: sampling mask, acceleration, coils, noise.

    Attributes
    ----------
    mask_type : str
        A key of :data:`MASK_TYPES`: the 1D Cartesian ``"random"``, ``"equispaced"``,
        ``"equispaced_fraction"``, ``"magic"``, ``"magic_fraction"`` (fastMRI semantics) or
        the 2D ``"variable_density"``, ``"poisson"``.
    acceleration : float
        Undersampling factor (an integer for ``"equispaced"`` and ``"magic"``).
    center_fraction : float
        Fraction of fully sampled central columns (1D masks).
    n_coils : int
        Receive coils (simulated for synthetic data; recorded in the protocol vector).
    noise_std : float
        Complex k-space noise standard deviation of synthetic data.
    calib_size : int
        Side of the fully sampled calibration box of the 2D masks.
    """

    mask_type: str = "random"
    acceleration: float = 4.0
    center_fraction: float = 0.08
    n_coils: int = 8
    noise_std: float = 0.002
    calib_size: int = 16

    def __post_init__(self) -> None:
        if self.mask_type not in MASK_TYPES:
            close = difflib.get_close_matches(self.mask_type, list(MASK_TYPES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"MRIAcquisition: 'mask_type' must be one of {tuple(MASK_TYPES)};"
                              f" got {self.mask_type!r}{hint}")
        if not (math.isfinite(self.acceleration) and self.acceleration >= 1):
            raise ConfigError(f"MRIAcquisition: 'acceleration' must be a finite number >= 1; "
                              f"got {self.acceleration}")
        if self.mask_type in _INTEGER_ACCELERATION and self.acceleration != int(self.acceleration):
            raise ConfigError(f"MRIAcquisition: mask_type {self.mask_type!r} needs an integer "
                              f"'acceleration'; got {self.acceleration}")
        if not 0 <= self.center_fraction <= 1:
            raise ConfigError(f"MRIAcquisition: 'center_fraction' must lie in [0, 1]; "
                              f"got {self.center_fraction}")
        if self.n_coils < 1 or self.calib_size < 0 or not (math.isfinite(self.noise_std)
                                                            and self.noise_std >= 0):
            raise ConfigError(f"MRIAcquisition: need n_coils >= 1, calib_size >= 0 and "
                              f"noise_std >= 0; got {self.n_coils}, {self.calib_size}, "
                              f"{self.noise_std}")

    def mask_function(self, seed: int | None = None) -> MaskFunction:
        """The :mod:`fedrecon.operators` mask function of this acquisition (own RandomState
        seeded with ``seed``; datasets reseed it per volume)."""
        return MASK_TYPES[self.mask_type](self, seed)

    @staticmethod
    def protocol_fields() -> tuple[str, ...]:
        """Names of the entries of :meth:`protocol_vector`."""
        return ("acceleration", "center_fraction", "n_coils", "noise_std",
                *(f"mask_{name}" for name in MASK_TYPES))

    def protocol_vector(self) -> Tensor:
        """float32 ``(4 + len(MASK_TYPES),)``: acceleration, centre fraction, coils, noise
        level, then the one-hot mask type (see :meth:`protocol_fields`)."""
        one_hot = [float(name == self.mask_type) for name in MASK_TYPES]
        values = [self.acceleration, self.center_fraction, self.n_coils, self.noise_std]
        return torch.tensor(values + one_hot, dtype=torch.float32)


# -- does an acquisition fit a k-space shape? (a dry run of the real mask function) -----------
_MASKS_2D = ("variable_density", "poisson")


def _dry_run(acq: MRIAcquisition, shape: tuple[int, ...]) -> tuple[str | None, int]:
    """Draw ``acq``'s mask for k-space of ``shape`` as a dataset does: (error, ACS width)."""
    try:
        _, n_low = acq.mask_function(seed=0)(shape, seed=0)
    except (ValueError, ArithmeticError, IndexError, ConfigError) as err:
        return (str(err).splitlines()[0] if str(err) else type(err).__name__), 0
    return None, int(n_low)


def _variant(acq: MRIAcquisition, key: str, value: Any) -> MRIAcquisition | None:
    try:
        return dataclasses.replace(acq, **{key: value})
    except ConfigError:
        return None


def _largest(acq: MRIAcquisition, key: str, values: Sequence[Any],
             ok: Callable[[MRIAcquisition], bool]) -> Any:
    """The largest of the ascending ``values`` of ``key`` for which ``ok`` holds (bisection:
    the smaller values are the easier ones); ``None`` when none does."""
    lo, hi, best = 0, len(values) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        variant = _variant(acq, key, values[mid])
        if variant is not None and ok(variant):
            best, lo = values[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _smallest(acq: MRIAcquisition, key: str, values: Sequence[Any],
              ok: Callable[[MRIAcquisition], bool]) -> Any:
    for value in values:
        variant = _variant(acq, key, value)
        if variant is not None and ok(variant):
            return value
    return None


def _lower_accelerations(acq: MRIAcquisition) -> list[float]:
    step = 1.0 if acq.mask_type in _INTEGER_ACCELERATION else 0.5
    return [1.0 + step * i for i in range(int((acq.acceleration - 1.0) / step) + 1)
            if 1.0 + step * i < acq.acceleration]


def check_acquisition_fits(acq: MRIAcquisition, shape: Sequence[int], where: str, *,
                           min_acs_ok: Callable[[int], bool] | None = None,
                           what: str = "") -> None:
    """Raise a one-line :class:`ConfigError` naming ``where`` and the key when ``acq``'s mask
    cannot be drawn for k-space of ``shape`` ``(C, H, W)``, or (``min_acs_ok``, e.g. the
    ESPIRiT coil-map check) when its fully sampled centre is refused; the message says which
    value would work, found by dry runs of the same mask function on the same shape."""
    shape = tuple(int(s) for s in shape)
    h, w = shape[-2], shape[-1]
    on = f"the {h}x{w} k-space{what}"
    err, n_low = _dry_run(acq, shape)
    two_d = acq.mask_type in _MASKS_2D

    def mask_ok(a: MRIAcquisition) -> bool:
        return _dry_run(a, shape)[0] is None

    def acs_ok(a: MRIAcquisition) -> bool:
        e, n = _dry_run(a, shape)  # a suggestion keeps a fully sampled centre
        return e is None and n > 0 and (min_acs_ok is None or min_acs_ok(n))

    if err is not None:
        head = f"{where}: the {acq.mask_type!r} mask cannot be drawn for {on} ({err})"
        if two_d:
            best = _largest(acq, "calib_size", list(range(min(h, w) + 1)), mask_ok)
            if best is not None and best < acq.calib_size:
                raise ConfigError(f"{head}: key 'calib_size' = {acq.calib_size} is too large; "
                                  f"use calib_size <= {best}")
        best = _largest(acq, "acceleration", _lower_accelerations(acq), mask_ok)
        if best is not None:
            raise ConfigError(f"{head}: key 'acceleration' = {acq.acceleration:g} is too high "
                              f"for {w} columns; use acceleration <= {best:g}")
        if not two_d:
            fractions = sorted({math.floor(k / w * 1000) / 1000 for k in range(w + 1)})
            best = _largest(acq, "center_fraction", fractions, mask_ok)
            if best is not None and best < acq.center_fraction:
                raise ConfigError(f"{head}: key 'center_fraction' = {acq.center_fraction:g} is "
                                  f"too large; use center_fraction <= {best:g}")
        raise ConfigError(f"{head}: key 'acceleration' = {acq.acceleration:g} does not fit; "
                          "lower it or use another mask_type")
    if min_acs_ok is None or min_acs_ok(n_low):
        return
    head = (f"{where}: the mask's fully sampled centre ({n_low} columns of {w}) is too narrow "
            f"for ESPIRiT coil maps on {on}")
    if two_d:
        best = _smallest(acq, "calib_size", list(range(min(h, w) + 1)), acs_ok)
        if best is not None:
            raise ConfigError(f"{head}: key 'calib_size' = {acq.calib_size} is too small; use "
                              f"calib_size >= {best}")
    else:
        fractions = sorted({math.ceil(k / w * 1000) / 1000 for k in range(w + 1)})
        best = _smallest(acq, "center_fraction", [f for f in fractions if f <= 1], acs_ok)
        if best is not None:
            raise ConfigError(f"{head}: key 'center_fraction' = {acq.center_fraction:g} is too "
                              f"small; use center_fraction >= {best:g}")
    best = _largest(acq, "acceleration", _lower_accelerations(acq), acs_ok)
    if best is not None:
        raise ConfigError(f"{head}: key 'acceleration' = {acq.acceleration:g} is too high; use "
                          f"acceleration <= {best:g}")
    key = "calib_size" if two_d else "center_fraction"
    raise ConfigError(f"{head}: raise key '{key}' or use another mask_type")


# -- data sources and site specs --------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    """Where a site's volumes come from.

    Attributes
    ----------
    kind : {"synthetic", "folder"}
        ``"folder"``: the files matching ``pattern`` in ``path`` (fastMRI ``.h5`` for MRI).
        ``"synthetic"``: volumes simulated under the simulation root.
    path, pattern : str
        The folder and glob of ``"folder"`` sources.
    n_volumes, n_slices, image_size : int
        Size of synthetic data.
    anatomy : {"auto", "mni152", "phantom"}
        Anatomy of synthetic data (:mod:`fedrecon.datasets.anatomy`).
    contrast : {"t1", "t2", "flair", "pd"}, optional
        Synthetic contrast; by default from ``sequence``.
    z_range : (float, float)
        Part of the brain's axial extent the synthetic slabs come from.
    sequence : str
        fastMRI acquisition label of synthetic MRI files (``"AXT1"``, ``"AXT2"``, ...).
    challenge : {"multicoil", "singlecoil"}
        fastMRI challenge of the MRI files.
    """

    kind: Literal["synthetic", "folder"] = "synthetic"
    path: str | None = None
    pattern: str = "*.h5"
    n_volumes: int = 4
    n_slices: int = 8
    image_size: int = 128
    anatomy: str = "auto"
    contrast: str | None = None
    z_range: tuple[float, float] = (0.25, 0.85)
    sequence: str = "AXT1"
    challenge: Literal["multicoil", "singlecoil"] = "multicoil"

    def __post_init__(self) -> None:
        if self.kind == "folder" and not self.path:
            raise ConfigError("DataSource: kind 'folder' needs key 'path'")
        if self.anatomy not in ANATOMY_SOURCES:
            raise ConfigError(f"DataSource: 'anatomy' must be one of {ANATOMY_SOURCES}; "
                              f"got {self.anatomy!r}")
        if self.contrast is not None and self.contrast not in CONTRASTS:
            raise ConfigError(f"DataSource: 'contrast' must be one of {tuple(CONTRASTS)}; "
                              f"got {self.contrast!r}")
        if min(self.n_volumes, self.n_slices) < 1 or self.image_size < 8:
            raise ConfigError(f"DataSource: need n_volumes, n_slices >= 1 and image_size >= 8;"
                              f" got {self.n_volumes}, {self.n_slices}, {self.image_size}")
        z = tuple(self.z_range)
        if len(z) != 2 or not 0.0 <= z[0] < z[1] <= 1.0:  # NaN fails too
            raise ConfigError(f"DataSource: 'z_range' must satisfy 0 <= lo < hi <= 1; "
                              f"got {self.z_range}")


def ct_acquisition_class() -> type:
    from .ct import CTAcquisition  # the CT work's dataclass; imported when a CT site appears

    return CTAcquisition


@dataclass(frozen=True)
class SiteSpec:
    """One site: name, modality, data source, split fractions and acquisition.

    ``acquisition`` is an :class:`MRIAcquisition` for ``modality="mri"`` and a
    ``fedrecon.datasets.ct.CTAcquisition`` for ``"ct"`` (defaults when omitted).
    ``split`` are the train / val / test fractions of the site's *volumes*.
    """

    name: str
    modality: Literal["mri", "ct"] = "mri"
    data: DataSource = field(default_factory=DataSource)
    acquisition: Any = None
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"SiteSpec: 'name' must be a non-empty string; got {self.name!r}")
        if self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            # the name is a folder (and file name prefix) under the data root
            raise ConfigError(f"SiteSpec: 'name' must not contain '/', '\\' or NUL, nor be "
                              f"'.' or '..' (it names the site's data folder); got {self.name!r}")
        if self.modality not in ("mri", "ct"):
            raise ConfigError(f"site {self.name!r}: 'modality' must be 'mri' or 'ct'; "
                              f"got {self.modality!r}")
        want = MRIAcquisition if self.modality == "mri" else ct_acquisition_class()
        if self.acquisition is None:
            object.__setattr__(self, "acquisition", want())
        elif not isinstance(self.acquisition, want):
            raise ConfigError(f"site {self.name!r}: 'acquisition' must be a {want.__name__} "
                              f"for modality {self.modality!r}; got "
                              f"{type(self.acquisition).__name__}")
        if (len(self.split) != 3 or min(self.split) < 0
                or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6) or self.split[0] <= 0):
            raise ConfigError(f"site {self.name!r}: 'split' must be 3 fractions (train, val, "
                              f"test) >= 0 summing to 1 with train > 0; got {self.split}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "site") -> SiteSpec:
        """Parse a ``[[sites]]`` table strictly (see :func:`dataclass_from_dict`)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must be a table; got {type(data).__name__}")
        where = f"{where} ({data['name']!r})" if isinstance(data.get("name"), str) else where
        raw = dict(data)
        acq = raw.pop("acquisition", None)
        spec = dataclass_from_dict(cls, raw, where)  # checks keys, types, modality
        if acq is not None:
            kind = MRIAcquisition if spec.modality == "mri" else ct_acquisition_class()
            acquisition = dataclass_from_dict(kind, acq, f"{where}.acquisition")
            spec = dataclasses.replace(spec, acquisition=acquisition)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the inverse of :meth:`from_dict`)."""
        out = dataclass_to_dict(self)
        out["data"] = dataclass_to_dict(self.data)
        out["acquisition"] = dataclass_to_dict(self.acquisition)
        return out


def load_site_specs(path: str | Path) -> list[SiteSpec]:
    """Read the ``[[sites]]`` tables of a TOML file (other top-level tables are left to the
    rest of the config). Errors name the file, the site and the key."""
    path = Path(path)
    with path.open("rb") as fh:
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    if "sites" not in doc:
        close = difflib.get_close_matches("sites", list(doc), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{path}: no [[sites]] tables{hint}")
    if not isinstance(doc["sites"], list):
        raise ConfigError(f"{path}: 'sites' must be an array of tables ([[sites]])")
    specs = [SiteSpec.from_dict(d, f"{path}: sites[{i}]") for i, d in enumerate(doc["sites"])]
    check_unique_names(specs)
    return specs


def site_specs_to_toml(specs: Sequence[SiteSpec]) -> str:
    """The TOML text of ``specs`` (``None`` values are left out: they are the defaults)."""
    lines: list[str] = []
    for spec in specs:
        d = spec.to_dict()
        lines.append("[[sites]]")
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        lines += [f"{k} = {toml_value(v)}" for k, v in d.items()
                  if k not in tables and v is not None]
        for key, table in tables.items():
            lines.append(f"[sites.{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def dump_site_specs(specs: Sequence[SiteSpec], path: str | Path) -> Path:
    """Write ``specs`` as a sites TOML file that :func:`load_site_specs` reads back."""
    path = Path(path)
    path.write_text(site_specs_to_toml(specs))
    return path


def check_unique_names(specs: Sequence[SiteSpec]) -> None:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"site names must be unique; repeated: {dup}")
