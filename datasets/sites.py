"""Heterogeneous federated sites: specs (TOML), simulation with volume-disjoint splits, and
recipes for the non-IID settings of the field.

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
import json
import math
import tempfile
import tomllib
import types
import typing
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
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

from .anatomy import ANATOMY_SOURCES, CONTRASTS, FOV_MM

__all__ = [
    "MASK_TYPES",
    "ConfigError",
    "DataSource",
    "MRIAcquisition",
    "SiteData",
    "SiteSpec",
    "acquisition_per_site",
    "brain_hu",
    "check_volume_disjoint",
    "dataclass_from_dict",
    "dataset_per_site",
    "dump_site_specs",
    "leave_one_site_out",
    "load_site_specs",
    "simulate_sites",
    "site_specs_to_toml",
]

SPLITS = ("train", "val", "test")


class ConfigError(ValueError):
    """A site spec or sites file that does not parse: names the key and what was expected."""


# -- strict dataclass <- dict ------------------------------------------------------------------
def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"an array of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"an array of {_describe(args[0]) if args else 'values'}"
    if hint is type(None):
        return "absent (None)"
    if dataclasses.is_dataclass(hint):
        return f"a table ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


_MISMATCH = object()


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to ``hint`` (TOML arrays -> tuples, ints -> floats), or _MISMATCH."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            out = _coerce(value, arg, where)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if hint is type(None):
        return None if value is None else _MISMATCH
    if origin is Literal:
        return value if value in args else _MISMATCH
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _MISMATCH
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return _MISMATCH
            items = [_coerce(v, a, where) for v, a in zip(value, args)]
        else:
            items = [_coerce(v, args[0], where) if args else v for v in value]
        if any(item is _MISMATCH for item in items):
            return _MISMATCH
        return tuple(items) if origin is tuple else list(items)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return dataclass_from_dict(hint, value, where) if isinstance(value, Mapping) else _MISMATCH
    return value if isinstance(hint, type) and isinstance(value, hint) else _MISMATCH


def dataclass_from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys, missing required keys and wrong
    types are a :class:`ConfigError` naming ``where``, the key and what was expected."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table of keys; got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint} "
                              f"(valid keys: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key '{name}' "
                                  f"({_describe(hints[name])})")
            continue
        value = _coerce(data[name], hints[name], f"{where}.{name}")
        if value is _MISMATCH:
            raise ConfigError(f"{where}: key '{name}' must be {_describe(hints[name])}; "
                              f"got {data[name]!r} ({type(data[name]).__name__})")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from err


def _to_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


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
        if not self.acceleration >= 1:
            raise ConfigError(f"MRIAcquisition: 'acceleration' must be >= 1; "
                              f"got {self.acceleration}")
        if self.mask_type in _INTEGER_ACCELERATION and self.acceleration != int(self.acceleration):
            raise ConfigError(f"MRIAcquisition: mask_type {self.mask_type!r} needs an integer "
                              f"'acceleration'; got {self.acceleration}")
        if not 0 <= self.center_fraction <= 1:
            raise ConfigError(f"MRIAcquisition: 'center_fraction' must lie in [0, 1]; "
                              f"got {self.center_fraction}")
        if self.n_coils < 1 or self.calib_size < 0 or self.noise_std < 0:
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


def _ct_acquisition_class() -> type:
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
        if self.modality not in ("mri", "ct"):
            raise ConfigError(f"site {self.name!r}: 'modality' must be 'mri' or 'ct'; "
                              f"got {self.modality!r}")
        want = MRIAcquisition if self.modality == "mri" else _ct_acquisition_class()
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
            kind = MRIAcquisition if spec.modality == "mri" else _ct_acquisition_class()
            acquisition = dataclass_from_dict(kind, acq, f"{where}.acquisition")
            spec = dataclasses.replace(spec, acquisition=acquisition)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the inverse of :meth:`from_dict`)."""
        out = _to_dict(self)
        out["data"] = _to_dict(self.data)
        out["acquisition"] = _to_dict(self.acquisition)
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
    _check_unique_names(specs)
    return specs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else
                                                 "-inf" if value == -math.inf else repr(value))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def site_specs_to_toml(specs: Sequence[SiteSpec]) -> str:
    """The TOML text of ``specs`` (``None`` values are left out: they are the defaults)."""
    lines: list[str] = []
    for spec in specs:
        d = spec.to_dict()
        lines.append("[[sites]]")
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()
                  if k not in tables and v is not None]
        for key, table in tables.items():
            lines.append(f"[sites.{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def dump_site_specs(specs: Sequence[SiteSpec], path: str | Path) -> Path:
    """Write ``specs`` as a sites TOML file that :func:`load_site_specs` reads back."""
    path = Path(path)
    path.write_text(site_specs_to_toml(specs))
    return path


def _check_unique_names(specs: Sequence[SiteSpec]) -> None:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"site names must be unique; repeated: {dup}")


# -- simulation ----------------------------------------------------------------------------
@dataclass
class SiteData:
    """A simulated site: its spec, datasets per split and the volume files behind them."""

    spec: SiteSpec
    train: Any
    val: Any | None
    test: Any | None
    files: dict[str, tuple[Path, ...]]
    protocol: Tensor

    @property
    def name(self) -> str:
        return self.spec.name


def _site_seed(seed: int, name: str) -> int:
    """A per-site seed that does not change when other sites are added or reordered."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]).generate_state(1)[0])


def _split_counts(n: int, fractions: Sequence[float], where: str) -> list[int]:
    """Largest-remainder counts; every split with a positive fraction gets a volume."""
    wanted = sum(f > 0 for f in fractions)
    if n < wanted:
        raise ConfigError(f"{where}: {n} volume(s) cannot fill {wanted} non-empty splits")
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if fractions[i] > 0 and counts[i] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    return counts


def _volume_files(spec: SiteSpec, root: Path, site_seed: int) -> list[Path]:
    src = spec.data
    if src.kind == "folder":
        files = sorted(p for p in Path(src.path).expanduser().glob(src.pattern) if p.is_file())
        if not files:
            raise ConfigError(f"site {spec.name!r}: no files match {src.pattern!r} in "
                              f"{src.path}")
        return files
    if spec.modality == "ct":
        return _synthetic_ct_volumes(spec, root / spec.name, site_seed)
    from .synthetic import make_synthetic_fastmri

    acq = spec.acquisition
    return make_synthetic_fastmri(
        root / spec.name, n_volumes=src.n_volumes, n_coils=acq.n_coils,
        image_size=src.image_size, n_slices=src.n_slices, seed=site_seed,
        noise_std=acq.noise_std, acquisition=src.sequence, anatomy=src.anatomy,
        contrast=src.contrast, z_range=src.z_range, challenge=src.challenge,
        name_prefix=f"{spec.name}_{src.sequence}_", overwrite=True)


def brain_hu(t1: np.ndarray, pixel_mm: float) -> np.ndarray:
    """CT numbers (HU) ``(S, N, N)`` of T1 brain slices in ``[0, 1]``: tissue from the T1
    intensity (CSF 8, white matter 28, grey matter 40 HU), then a CSF rim, a 7 mm skull
    (1000 HU) and 5 mm of scalp grown around the brain, air outside."""
    from scipy import ndimage

    # (thickness mm, HU) from the brain outwards; on coarse grids skull and scalp keep one
    # pixel each and a CSF rim thinner than a pixel is left out
    layers = ((2.0 if pixel_mm <= 2.0 else 0.0, 8.0), (max(7.0, pixel_mm), 1000.0),
              (max(5.0, pixel_mm), 40.0))
    hu = np.full(t1.shape, -1000.0, dtype=np.float32)
    for s, img in enumerate(t1):
        brain = ndimage.binary_fill_holes(img > 0.02)
        dist = ndimage.distance_transform_edt(~brain) * pixel_mm
        hu[s][brain] = np.interp(img[brain], (0.0, 0.35, 0.65, 0.87, 1.0),
                                 (8.0, 8.0, 40.0, 28.0, 28.0))
        inner = 0.0
        for thickness, value in layers:
            hu[s][(dist > inner) & (dist <= inner + thickness + 1e-6)] = value
            inner += thickness
    return hu


def _synthetic_ct_volumes(spec: SiteSpec, out_dir: Path, site_seed: int) -> list[Path]:
    """CT volume files (HU, :func:`fedrecon.datasets.ct.write_ct_volume`) of brain slices
    from the same anatomy, for ``CTSliceDataset`` to project with the site's geometry/dose."""
    from .anatomy import load_brain_slices
    from .ct import write_ct_volume

    src = spec.data
    pixel_mm = FOV_MM / src.image_size
    paths = []
    for i, child in enumerate(np.random.SeedSequence(site_seed).spawn(src.n_volumes)):
        t1 = load_brain_slices(src.n_slices, src.image_size, source=src.anatomy, seed=child,
                               z_range=src.z_range).images
        name = f"{spec.name}_ct_{i:03d}"
        paths.append(write_ct_volume(out_dir / f"{name}.h5", brain_hu(t1, pixel_mm), units="HU",
                                     pixel_spacing=pixel_mm, patient_id=name, overwrite=True))
    return paths


def _make_dataset(spec: SiteSpec, files: list[Path], site_seed: int,
                  coil_maps: str | None = None) -> Any:
    acq = spec.acquisition
    if spec.modality == "mri":
        from .fastmri import FastMRISliceDataset

        maps = coil_maps if spec.data.challenge == "multicoil" else None
        return FastMRISliceDataset(files, challenge=spec.data.challenge,
                                   mask=acq.mask_function(seed=site_seed), coil_maps=maps,
                                   protocol=acq.protocol_vector(), seed=site_seed)
    from .ct import CTSliceDataset

    return CTSliceDataset(files, acquisition=acq, seed=site_seed)


def check_volume_disjoint(sites: Mapping[str, SiteData]) -> None:
    """Raise ``AssertionError`` when a volume file (by resolved path or by file name) is in
    two splits or two sites."""
    seen: dict[str, tuple[str, str]] = {}
    for site in sites.values():
        for split, files in site.files.items():
            for f in files:
                for key in (str(Path(f).resolve()), Path(f).name):
                    if key in seen:
                        raise AssertionError(
                            f"volume {key} is in {seen[key][0]}/{seen[key][1]} and in "
                            f"{site.name}/{split}: splits must be volume-disjoint")
                    seen[key] = (site.name, split)


def simulate_sites(specs: Sequence[SiteSpec], seed: int, *,
                   root: str | Path | None = None,
                   coil_maps: str | None = None) -> dict[str, SiteData]:
    """Datasets for each site, split by volume.

    Parameters
    ----------
    specs : sequence of SiteSpec
        The sites (unique names).
    seed : int
        Seeds synthetic data, splits and masks; each site derives its own seed from ``seed``
        and its name, so a site's data does not change when other sites are added.
    root : str or Path, optional
        Folder for synthetic volumes (``root/<site name>/``); a new temporary folder when
        omitted and a site is synthetic.
    coil_maps : {None, "espirit"}
        Multicoil MRI: estimate ESPIRiT coil maps from each volume's ACS lines (cached in a
        sidecar next to the volumes), as SENSE-based networks need them.

    Returns
    -------
    dict of str to SiteData
        In the order of ``specs``. MRI splits are ``FastMRISliceDataset`` with the site's
        mask function and protocol vector; CT splits are ``CTSliceDataset``.
    """
    _check_unique_names(specs)
    if root is None and any(s.data.kind == "synthetic" for s in specs):
        root = tempfile.mkdtemp(prefix="fedrecon-sites-")
    root = Path(root) if root is not None else Path.cwd()
    sites: dict[str, SiteData] = {}
    for spec in specs:
        site_seed = _site_seed(seed, spec.name)
        files = _volume_files(spec, root, site_seed)
        order = np.random.default_rng(site_seed).permutation(len(files))
        counts = _split_counts(len(files), spec.split, f"site {spec.name!r}")
        bounds = np.cumsum([0, *counts])
        split_files = {name: tuple(files[j] for j in order[bounds[k]:bounds[k + 1]])
                       for k, name in enumerate(SPLITS)}
        datasets = {name: _make_dataset(spec, list(fs), site_seed, coil_maps) if fs else None
                    for name, fs in split_files.items()}
        sites[spec.name] = SiteData(spec, datasets["train"], datasets["val"], datasets["test"],
                                    split_files, spec.acquisition.protocol_vector())
    check_volume_disjoint(sites)
    return sites


# -- recipes for non-IID settings ----------------------------------------------------------
# (sequence, contrast, axial range): a different contrast and anatomy region per site
_DATASET_VARIANTS = (
    ("AXT1", "t1", (0.10, 0.50)),    # posterior fossa to basal ganglia
    ("AXT2", "t2", (0.35, 0.75)),    # ventricles
    ("AXFLAIR", "flair", (0.55, 0.95)),  # centrum semiovale to vertex
    ("CORPD_FBK", "pd", (0.25, 0.85)),
)


def dataset_per_site(n_sites: int = 3, *, acquisition: MRIAcquisition | None = None,
                     n_volumes: int = 4, n_slices: int = 8, image_size: int = 128,
                     anatomy: str = "auto",
                     split: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> list[SiteSpec]:
    """Sites that differ by data (contrast and anatomy region), with one shared acquisition.

    Returns ``n_sites`` synthetic MRI specs named ``site<k>_<sequence>``.
    """
    acquisition = acquisition or MRIAcquisition()
    specs = []
    for k in range(n_sites):
        sequence, contrast, z_range = _DATASET_VARIANTS[k % len(_DATASET_VARIANTS)]
        data = DataSource(kind="synthetic", n_volumes=n_volumes, n_slices=n_slices,
                          image_size=image_size, anatomy=anatomy, contrast=contrast,
                          z_range=z_range, sequence=sequence)
        specs.append(SiteSpec(f"site{k}_{sequence.lower()}", "mri", data, acquisition, split))
    return specs


# FedMRI-style: masks, accelerations and coil arrays differ from site to site
_MRI_ACQUISITION_VARIANTS = (
    MRIAcquisition("random", 4.0, 0.08, n_coils=8, noise_std=0.002),
    MRIAcquisition("equispaced_fraction", 8.0, 0.04, n_coils=4, noise_std=0.004),
    MRIAcquisition("variable_density", 6.0, 0.08, n_coils=12, noise_std=0.002, calib_size=12),
    MRIAcquisition("equispaced", 4.0, 0.08, n_coils=16, noise_std=0.001),
    MRIAcquisition("poisson", 8.0, 0.08, n_coils=6, noise_std=0.003, calib_size=12),
)
# HyperFed-style: CT geometry, views and dose differ from site to site. CTAcquisition
# keywords, with det_spacing in pixels (the grid comes from the data source; fan distances
# in mm, a magnification (source + detector) / source of 1.8 and 1.5).
_CT_ACQUISITION_VARIANTS = (
    {"geometry": "parallel", "n_views": 180, "photons": 1e5, "det_spacing": 1.0},
    {"geometry": "fan", "n_views": 120, "photons": 5e4, "source_distance": 500.0,
     "detector_distance": 400.0, "det_spacing": 1.8},
    {"geometry": "parallel", "n_views": 60, "photons": 2e4, "angle_range": 2.0,
     "det_spacing": 1.0},
    {"geometry": "fan", "n_views": 90, "photons": 1e4, "source_distance": 600.0,
     "detector_distance": 300.0, "det_spacing": 1.5},
)


def acquisition_per_site(n_sites: int = 3, modality: Literal["mri", "ct"] = "mri", *,
                         data: DataSource | None = None,
                         split: tuple[float, float, float] = (0.6, 0.2, 0.2)
                         ) -> list[SiteSpec]:
    """Sites that share their kind of data and differ by acquisition: masks, accelerations
    and coils for MRI (like FedMRI), geometry, views and dose for CT (like HyperFed).

    Returns ``n_sites`` specs named ``<modality>_acq<k>``.
    """
    data = data or DataSource()
    specs = []
    for k in range(n_sites):
        if modality == "mri":
            acq = _MRI_ACQUISITION_VARIANTS[k % len(_MRI_ACQUISITION_VARIANTS)]
        else:
            pixel_mm = FOV_MM / data.image_size
            kwargs = dict(_CT_ACQUISITION_VARIANTS[k % len(_CT_ACQUISITION_VARIANTS)])
            kwargs.update(det_spacing=kwargs["det_spacing"] * pixel_mm, pixel_spacing=pixel_mm,
                          image_size=(data.image_size, data.image_size))
            acq = dataclass_from_dict(_ct_acquisition_class(), kwargs, f"CT variant {k}")
        specs.append(SiteSpec(f"{modality}_acq{k}", modality, data, acq, split))
    return specs


def leave_one_site_out(specs: Sequence[SiteSpec], held_out: str | int
                       ) -> tuple[list[SiteSpec], SiteSpec]:
    """Split ``specs`` into the training sites and the unseen site ``held_out`` (name or
    index), for out-of-distribution evaluation."""
    names = [s.name for s in specs]
    if isinstance(held_out, int):
        if not -len(specs) <= held_out < len(specs):
            raise ConfigError(f"leave_one_site_out: index {held_out} out of range for "
                              f"{len(specs)} sites")
        index = held_out % len(specs)
    elif held_out in names:
        index = names.index(held_out)
    else:
        close = difflib.get_close_matches(str(held_out), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"leave_one_site_out: no site named {held_out!r}{hint} "
                          f"(sites: {names})")
    return [s for i, s in enumerate(specs) if i != index], specs[index]
