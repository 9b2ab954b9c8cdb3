"""Small CT federations for the runner tests (also imported by the kill/resume child
process, so it must not depend on pytest)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from fedrecon.datasets import (
    CTAcquisition,
    CTSliceDataset,
    collate_ct_samples,
    write_phantom_volumes,
)
from torch import nn
from torch.utils.data import DataLoader

from fedrecon.federated import Site
from fedrecon.models import ModelConfig, build_model

SIZE = 16
VIEWS = (8, 12, 16, 10)


def tiny_model_factory(cond_dim: int = 0) -> Callable[[], nn.Module]:
    cfg = ModelConfig(n_iter=2, chans=4, num_pools=1, cond_dim=cond_dim)
    return lambda: build_model(cfg, complex_images=False)


def acquisition(k: int) -> CTAcquisition:
    spacing = 400.0 / SIZE
    return CTAcquisition(geometry="parallel", n_views=VIEWS[k % len(VIEWS)], image_size=(SIZE, SIZE),
                         pixel_spacing=spacing, det_spacing=spacing, photons=1e5)


def write_ct_files(root: Path, n_sites: int) -> list[Path]:
    """Two volumes (train, val) of 2 slices per site."""
    return write_phantom_volumes(root, n_volumes=2 * n_sites, n_slices=2, image_size=SIZE, seed=0,
                                 overwrite=True)


def make_ct_sites(files: list[Path], n_sites: int, *, cond_dim: int = 0,
                  seed: int = 0) -> list[Site]:
    """``n_sites`` CT sites with different view counts; shuffled training loaders with their
    own generator (so a resume must restore it)."""
    factory = tiny_model_factory(cond_dim)
    sites = []
    for k in range(n_sites):
        acq = acquisition(k)
        train = CTSliceDataset(files[2 * k: 2 * k + 1], acq, seed=k)
        val = CTSliceDataset(files[2 * k + 1: 2 * k + 2], acq, seed=100 + k)
        sites.append(Site(
            f"ct{k}", model_factory=factory,
            train_loader=DataLoader(train, batch_size=1, shuffle=True, collate_fn=collate_ct_samples,
                                    generator=torch.Generator().manual_seed(k)),
            val_loader=DataLoader(val, batch_size=2, collate_fn=collate_ct_samples),
            protocol=acq.protocol_vector(), seed=seed))
    return sites
