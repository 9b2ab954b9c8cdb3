"""Recipes for the non-IID settings of the field, as lists of :class:`SiteSpec`."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Literal

from .anatomy import FOV_MM
from .config import ConfigError, dataclass_from_dict
from .sites import DataSource, MRIAcquisition, SiteSpec, ct_acquisition_class

__all__ = ["acquisition_per_site", "dataset_per_site", "leave_one_site_out"]

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
            acq = dataclass_from_dict(ct_acquisition_class(), kwargs, f"CT variant {k}")
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
