"""Audit of everything that leaves a site: over full 2-round runs (FedAvg, default
partition, FiLM conditioning on) on CT and on multicoil MRI, every SiteUpdate carries
exactly the GLOBAL tensors, never a LOCAL one (DC step sizes, FiLM), and never a
measurement, coil map, mask, sinogram or target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _common import make_ct_sites, write_ct_files
from fedrecon.datasets import FastMRISliceDataset, collate_mri_samples, make_synthetic_fastmri
from fedrecon.operators import EquispacedFractionMask

from fedrecon.federated import FedAvg, Partition, Site, SiteUpdate
from fedrecon.models import ModelConfig, Role, Scope, build_model, state_roles
from fedrecon.runners import SimulationRunner

ROUNDS = 2
PRIVATE_FIELDS = ("kspace", "coil_maps", "mask", "sinogram", "target", "fbp")


def _mri_sites(root: Path, n_sites: int = 2) -> list[Site]:
    """32 px, 4 coils, ESPIRiT maps (>= 6 ACS columns: 20 % of 32 at 4x)."""
    cfg = ModelConfig(n_iter=2, chans=4, num_pools=1, cond_dim=3)  # protocol: acc, cf, coils
    factory = lambda: build_model(cfg, complex_images=True)
    sites = []
    for k in range(n_sites):
        files = make_synthetic_fastmri(root / f"site{k}", n_volumes=2, n_coils=4, image_size=32,
                                       n_slices=2, seed=k, anatomy="phantom")
        mask = EquispacedFractionMask([0.2], [4])
        train = FastMRISliceDataset(files[:1], mask=mask, coil_maps="espirit")
        val = FastMRISliceDataset(files[1:], mask=mask, coil_maps="espirit")
        sites.append(Site(f"mri{k}", model_factory=factory,
                          train_loader=DataLoader(train, batch_size=1, shuffle=True,
                                                  collate_fn=collate_mri_samples),
                          val_loader=DataLoader(val, batch_size=2, collate_fn=collate_mri_samples),
                          protocol=torch.tensor([4.0, 0.2, 4.0])))
    return sites


def _private_tensors(sites: list[Site]) -> list[torch.Tensor]:
    """Every measurement-side tensor of every site, per batch and per sample."""
    found = []
    for site in sites:
        for loader in (site.train_loader, site.val_loader):
            for batch in loader:
                for name in PRIVATE_FIELDS:
                    t = getattr(batch, name, None)
                    if isinstance(t, torch.Tensor):
                        found += [t, *t.unbind(0)]
    return found


def _assert_clean(update: SiteUpdate, model: torch.nn.Module, private: list[torch.Tensor]) -> None:
    partition = Partition.default()
    roles = state_roles(model)
    global_names = partition.names(model, Scope.GLOBAL)
    local_names = set(partition.names(model, Scope.LOCAL))
    private_shapes = {tuple(t.shape) for t in private}
    assert list(update.tensors) == global_names  # exactly the GLOBAL names, in order
    assert not set(update.tensors) & local_names
    for name, t in update.tensors.items():
        assert not name.startswith("dc.") and ".film" not in name and "films." not in name
        assert partition.scope(roles[name]) is Scope.GLOBAL
        assert tuple(t.shape) not in private_shapes, (name, tuple(t.shape))
        assert not any(t.shape == p.shape and torch.equal(t, p) for p in private)
    # metrics are plain numbers: no tensor rides along in them
    assert all(type(v) in (int, float) for v in update.metrics.values())


def _audit(sites: list[Site], run_dir: Path) -> list[SiteUpdate]:
    seen: list[SiteUpdate] = []
    runner = SimulationRunner(sites, FedAvg(local_steps=2, lr=3e-3), rounds=ROUNDS,
                              run_dir=run_dir, progress=False, on_update=seen.append)
    runner.run()
    assert len(seen) == ROUNDS * len(sites)

    model = sites[0].model_factory()
    roles = state_roles(model)
    local_names = set(Partition.default().names(model, Scope.LOCAL))
    # the model really has LOCAL tensors of every default-local kind that exists here
    assert {roles[n] for n in local_names} >= {Role.DC, Role.CONDITIONING}
    private = _private_tensors(sites)
    assert private

    for update in seen:
        _assert_clean(update, model, private)
    # and the LOCAL state did stay at the sites
    for site in sites:
        kept = runner.store.get(site.site_id)["local"]
        assert set(kept) == local_names
    return seen


def test_ct_updates_carry_only_global_tensors(tmp_path):
    files = write_ct_files(tmp_path / "data", 2)
    sites = make_ct_sites(files, 2, cond_dim=8)  # CT protocol vector: 8 fields
    _audit(sites, tmp_path / "run")


def test_mri_updates_carry_only_global_tensors(tmp_path):
    sites = _mri_sites(tmp_path / "data")
    assert next(iter(sites[0].train_loader)).coil_maps is not None
    _audit(sites, tmp_path / "run")


def test_the_audit_catches_leaks(tmp_path):
    """The audit must fail on an update that carries a LOCAL tensor or a measurement."""
    files = write_ct_files(tmp_path / "data", 2)
    sites = make_ct_sites(files, 2, cond_dim=8)
    model = sites[0].model_factory()
    private = _private_tensors(sites)
    clean = Partition.default().global_state(model)
    _assert_clean(SiteUpdate("ct0", 0, clean, "weights", 1), model, private)
    film = next(k for k in model.state_dict() if "film" in k)
    name = next(iter(clean))
    leaks = [clean | {"dc.raw_step": model.state_dict()["dc.raw_step"]},
             clean | {film: model.state_dict()[film]},
             {k: v for k, v in clean.items() if k != name},
             clean | {name: private[0].clone()}]
    for tensors in leaks:
        with pytest.raises(AssertionError):
            _assert_clean(SiteUpdate("ct0", 0, tensors, "weights", 1), model, private)
