"""Site simulation: specs -> per-site train/val/test datasets, split by volume, with the
site's mask function and protocol vector; synthetic MRI and CT volumes on demand."""

from __future__ import annotations

import math
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .anatomy import FOV_MM
from .config import ConfigError
from .sites import SPLITS, SiteSpec, check_unique_names

__all__ = ["SPLITS", "SiteData", "brain_hu", "check_volume_disjoint", "make_site_dataset",
           "simulate_sites", "site_seed"]

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


def site_seed(seed: int, name: str) -> int:
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


def make_site_dataset(spec: SiteSpec, files: list[Path], site_seed: int,
                      coil_maps: str | None = None) -> Any:
    """The dataset of ``files`` under the site's acquisition (mask seeded by ``site_seed``)."""
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
    check_unique_names(specs)
    for spec in specs:  # before any volume is written: a bad split fails fast, leaves nothing
        if spec.data.kind == "synthetic":
            _split_counts(spec.data.n_volumes, spec.split, f"site {spec.name!r}")
    if root is None and any(s.data.kind == "synthetic" for s in specs):
        root = tempfile.mkdtemp(prefix="fedrecon-sites-")
    root = Path(root) if root is not None else Path.cwd()
    sites: dict[str, SiteData] = {}
    for spec in specs:
        seed_of_site = site_seed(seed, spec.name)
        files = _volume_files(spec, root, seed_of_site)
        order = np.random.default_rng(seed_of_site).permutation(len(files))
        counts = _split_counts(len(files), spec.split, f"site {spec.name!r}")
        bounds = np.cumsum([0, *counts])
        split_files = {name: tuple(files[j] for j in order[bounds[k]:bounds[k + 1]])
                       for k, name in enumerate(SPLITS)}
        datasets = {name: make_site_dataset(spec, list(fs), seed_of_site, coil_maps) if fs else None
                    for name, fs in split_files.items()}
        sites[spec.name] = SiteData(spec, datasets["train"], datasets["val"], datasets["test"],
                                    split_files, spec.acquisition.protocol_vector())
    check_volume_disjoint(sites)
    return sites
